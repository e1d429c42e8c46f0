"""The base models' own objectives (method-free): `vae` (reconstruction + KL) and `t2v` (AnimateDiff's
text-to-video eps loss, UNet3D and optionally its text encoder). Customization methods keep their
objectives in vcjax/methods/."""
