"""sdlearn: learn Stable Diffusion by building it.

The package is layered: a module imports only from the layers above it in this table (function-level imports
included) and never another module's ``_private`` names. Within a layer: in the foundations and the interfaces
a module may import those listed before it; among the models only ``text`` imports ``denoiser`` (its attention
block), ``flow`` imports ``samplers`` (their interface), ``adapt`` imports ``text`` (a new word), ``control``
imports ``denoiser`` (the blocks it copies) and ``distill`` imports ``denoiser`` and ``samplers`` (the student and
its sampler); in the assembly only ``pretrained`` imports ``pipeline``; among the recipes ``recipes`` and
``distill_recipes`` import ``denoiser_data``, and only ``own_data``, ``adapt_recipes``, ``control_recipes`` and
``distill_recipes`` import ``recipes``. ``tests/test_layers.py`` enforces the rule.

====================  ===========================================================================
layer                 modules
====================  ===========================================================================
foundations           ``checks`` (shared input checks), ``checkpoint`` (file format, config base
                      class, loading weights), ``images`` (an image folder, a photograph),
                      ``captions`` (the attributes' names, captions and their parser),
                      ``data`` (Shapes, rendering, the star; re-exports ``captions``),
                      ``schedules`` (β, ᾱ, SNR, add_noise, ε/x₀/v conversions, the flow
                      path), ``stats``
                      (Wilson and bootstrap intervals, Fréchet distance, MMD², TV)
models and losses     ``vae``, ``denoiser`` (DiT, ``denoiser_loss``), ``unet`` (Stable Diffusion's
                      U-Net from scratch; ``UNet.from_diffusers``), ``text`` (tokenizer, text
                      encoder, TinyCLIP; uses the denoiser's attention block), ``metrics`` (the
                      attribute classifier, the scene reader, prompt accuracy, KID, FID,
                      diversity, memorisation), ``samplers``, ``flow`` (rectified flow's
                      samplers, EDM's preconditioning and Heun, an exact Gaussian mixture;
                      imports ``samplers``), ``adapt`` (personalisation: LoRA, textual
                      inversion, DreamBooth's prior preservation, adapter files; imports
                      ``text``), ``control`` (the edge map, the ControlNet for the DiT; imports
                      ``denoiser``), ``distill`` (the consistency student, its sampler and
                      loss; imports ``denoiser`` and ``samplers``)
the generic loop      ``training`` (``train``, EMA, ``TrainResult``, ``resolve_device``,
                      ``step_generator``)
assembly              ``pipeline`` (text→image, img2img, inpainting), ``pretrained`` (every
                      ``save_X`` with its ``load_X``, ``load_pipeline``), ``stable_diffusion``
                      (SD v1.5's sizes and block map; a local diffusers SD folder run by
                      sdlearn's U-Net, samplers and guidance)
recipes               ``denoiser_data`` (the denoiser's training batches: VAE latents of
                      Shapes scenes, a fresh random caption at every use), ``recipes``
                      (``train_vae``, ``train_clip``, ``train_classifier``,
                      ``train_scene_reader``, ``train_denoiser``, ``train_all`` on one
                      skeleton), ``own_data`` (your own captioned images: the captions'
                      vocabulary, ``train_all_on_folder``; imports ``recipes``),
                      ``adapt_recipes`` (``train_adapter``: the star taught to a trained
                      pipeline; ``train_star_reader``, its judge; imports ``recipes``),
                      ``control_recipes`` (``train_controlnet``, ``control_accuracy``, the
                      ControlNet's file; imports ``recipes``),
                      ``distill_recipes`` (``train_distill``: the few-step student of the
                      DiT; imports ``recipes``)
interfaces            ``plotting``, ``widgets``, ``exercises/``, ``__main__`` (the command line)
====================  ===========================================================================
"""

__version__ = "0.1.0"
