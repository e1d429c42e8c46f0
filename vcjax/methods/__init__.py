"""Customization methods built on the AnimateDiff UNet3D: VideoMaker (`videomaker`)."""
