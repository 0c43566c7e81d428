"""Model runners over diffusers' classes, builders and tiny configs.

We never re-implement ``UNet2DConditionModel``, ``ControlNetModel``, ``AutoencoderKL`` or
``CLIPTextModel``; the runners here only split their forward passes so that control enters the
U-Net as data (see ``runner.py``).
"""
