from setuptools import find_packages, setup

# Install torch before this package on machines where a specific build is wanted (README): a bare
# "torch" requirement with nothing installed pulls the newest CUDA build.
setup(
    name="fastlora",
    version="0.1.0",
    description="Fused Triton LoRA kernels behind PEFT's API and checkpoint format",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Every package under fastlora/, found rather than listed (a forgotten one is missing from a wheel),
    # plus kernels/ installed as fastlora.kernels.
    packages=[*find_packages(include=["fastlora", "fastlora.*"]), "fastlora.kernels"],
    package_dir={"fastlora.kernels": "kernels"},
    install_requires=["torch>=2.6", "transformers>=4.45", "safetensors>=0.4", "tqdm>=4.60", "numpy>=1.22"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["peft>=0.21,<0.23", "pytest>=7", "pytest-benchmark>=4", "accelerate>=0.30", "triton>=3.0", "bitsandbytes>=0.48"],
        "bench": ["pytest-benchmark>=4", "peft>=0.21,<0.23", "matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["fastlora=fastlora.cli:main"]},
)
