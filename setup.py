from setuptools import find_packages, setup

setup(
    name="clip-lora",
    version="0.1.0",
    description="Fused Triton LoRA kernels and the CLIP-LoRA few-shot recipe for open_clip",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lora_kernels", "lora_kernels.*", "clip_lora", "clip_lora.*", "bench", "bench.*"]),
    package_data={"clip_lora": ["data/*.txt", "data/*.json"]},
    install_requires=[
        "torch>=2.5",
        "triton>=3.1",
        "open_clip_torch>=2.24",
        "numpy",
        "safetensors",
        "tqdm",
        "pillow",
    ],
    extras_require={
        # transformers: the HF text towers (multilingual CLIPs) and transformers' CLIP/SigLIP models.
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "ruff", "transformers>=4.40"],
        "bench": ["pytest-benchmark>=4", "matplotlib"],
        "hf": ["transformers>=4.40"],  # open_clip's HF text towers; transformers' CLIPModel / SiglipModel
    },
    entry_points={"console_scripts": ["clip-lora = clip_lora.cli:main"]},
)
