"""mmbrecq package. torch/torchvision and mmcv (built with ops) are installed by
tools/setup_env.sh, which pins them; see the README."""
import os.path as osp

from setuptools import find_packages, setup


def read_requirements(name):
    with open(osp.join(osp.dirname(__file__), 'requirements', name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith('#')]


version = {}
with open(osp.join(osp.dirname(__file__), 'mmbrecq', 'version.py')) as f:
    exec(f.read(), version)

setup(
    name='mmbrecq',
    version=version['__version__'],
    description='BRECQ post-training quantization for OpenMMLab (mmpretrain, mmdet)',
    long_description=open(osp.join(osp.dirname(__file__), 'README.md')).read(),
    long_description_content_type='text/markdown',
    packages=find_packages(exclude=('tests', 'configs', 'tools', 'benchmarks')),
    # C++ source of the fused CPU kernels, compiled on first use (mmbrecq/ops/cpu_kernels.py)
    package_data={'mmbrecq.ops': ['csrc/*.cpp']},
    python_requires='>=3.9',
    install_requires=read_requirements('runtime.txt'),
    extras_require=dict(tests=read_requirements('tests.txt'), optional=read_requirements('optional.txt')),
    license='Apache-2.0',
)
