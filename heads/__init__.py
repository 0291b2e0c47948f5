"""Task heads trained on diffusion features: linear probes and few-shot segmentation."""
