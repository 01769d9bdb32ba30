"""One owner per concept: only mmbrecq.quantizers changes a quantizer's grid and range."""
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'mmbrecq'
#: assignments to a quantizer's state (``q.bits = ...``, ``q.scale.data.copy_(...)``, ...);
#: ``self.<field> =`` is a class's own field (an export spec), not a quantizer's
STATE_WRITE = re.compile(r'(?<!self)\.(bits|qmin|qmax|zero_point|initialized|observing)\s*(=[^=]|\+=)|'
                         r'\.scale\.data\b|\.zero_point\.(copy_|fill_|zero_)|\.qmin,\s*\w+\.qmax\s*=')


def _writes(root):
    found = []
    for path in sorted(root.rglob('*.py')):
        if 'quantizers' in path.relative_to(root).parts:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if STATE_WRITE.search(line.split('#')[0]):
                found.append(f'{path.relative_to(root)}:{i}: {line.strip()}')
    return found


def test_no_quantizer_state_written_outside_the_quantizers():
    assert _writes(PACKAGE) == []


def test_the_check_finds_a_write(tmp_path):
    pkg = tmp_path / 'mmbrecq'
    (pkg / 'engine').mkdir(parents=True)
    (pkg / 'engine' / 'x.py').write_text(
        'q.bits = 4\nq.scale.data.copy_(s)\nq.qmin, q.qmax = 0, 3\nok = q.bits == 4\nself.bits = 2\n')
    (pkg / 'quantizers').mkdir()
    (pkg / 'quantizers' / 'y.py').write_text('self.bits = bits\nq.bits = 2\n')  # the owner may
    assert [w.split(':')[1] for w in _writes(pkg)] == ['1', '2', '3']
