"""Customization methods built on the AnimateDiff UNet3D, one package each: `videomaker`, `customcrafter`."""
