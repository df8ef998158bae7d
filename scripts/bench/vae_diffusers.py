"""The PyTorch side of `motley bench tokenizers --only vae,vq-model`: builds a randomly
initialized diffusers AutoencoderKL of Stable Diffusion's published VAE geometry, or a VQModel
of a VQ-GAN's (Chameleon's: 16x downsampling, 8192 codes; no download), saves it where motley
loads it from, and times diffusers' own encode (posterior mean, scaled; or the codes) on the
same images, batch and thread count. Prints one JSON line.

    python scripts/bench/vae_diffusers.py --out DIR --images a.png b.png --resolution 256 \
        --batch 4 --threads 1 --seconds 5 [--arch kl|vq] [--device cuda] [--save]
"""

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from diffusers import AutoencoderKL, VQModel

# Stable Diffusion 1.x/2.x `vae/config.json` (the SDXL VAE has the same geometry).
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

# A VQ-GAN of the taming-transformers family (Chameleon's image tokenizer geometry: 16x
# downsampling, 8192 codes; 256-wide codes here as in diffusers' VQModel default layout).
VQ_GAN = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 5,
    up_block_types=["UpDecoderBlock2D"] * 5,
    block_out_channels=[128, 128, 256, 256, 512],
    layers_per_block=2,
    latent_channels=256,
    num_vq_embeddings=8192,
    vq_embed_dim=256,
    norm_num_groups=32,
    sample_size=256,
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", nargs="+", required=True)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--arch", choices=["kl", "vq"], default="kl")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N], as motley's --encoder-device")
    ap.add_argument("--save", action="store_true", help="build and save the model first")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cls, geometry = (AutoencoderKL, SD_VAE) if a.arch == "kl" else (VQModel, VQ_GAN)
    if a.save:
        torch.manual_seed(0)
        cls(**geometry).save_pretrained(a.out, safe_serialization=True)
    dev = torch.device(a.device)
    vae = cls.from_pretrained(a.out).eval().to(dev)

    def encode(x):
        # Results come back to the host, as motley's do.
        if a.arch == "kl":
            return (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).cpu()
        # VQModel.encode stops after quant_conv; the codes are the quantizer's indices.
        return vae.quantize(vae.encode(x).latents)[2][2].cpu()

    imgs = [Image.open(p).convert("RGB").resize((a.resolution, a.resolution), Image.BICUBIC) for p in a.images]
    u8 = np.stack([np.asarray(i) for i in imgs[: a.batch]])
    x = 2.0 * torch.from_numpy(u8.astype(np.float32) / 255.0).permute(0, 3, 1, 2) - 1.0
    x = x.to(dev)
    n = 0
    with torch.no_grad():
        encode(x)  # warm-up
        start = time.perf_counter()
        while True:
            z = encode(x)
            n += x.shape[0]
            if time.perf_counter() - start >= a.seconds:
                break
        secs = time.perf_counter() - start
    print(json.dumps({"images": n, "seconds": secs, "images_per_s": n / secs, "batch": x.shape[0],
                      "latent_shape": list(z.shape), "torch": torch.__version__, "device": str(dev)}))


if __name__ == "__main__":
    main()
