"""The tiny diffusers AutoencoderKL of FLUX geometry (8x, 16 channels) the VAE tests compare against."""

SCALE, SHIFT = 0.3611, 0.1159
TINY_CONFIG = dict(
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    scaling_factor=SCALE,
    shift_factor=SHIFT,
    use_quant_conv=False,
    use_post_quant_conv=False,
    sample_size=64,  # diffusers tiles: 64 px / 8 latents, overlap factor 0.25 -> 16 px / 2 latents
)
