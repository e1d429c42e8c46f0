"""A PyTorch statement of the full RAFT model (Teed & Deng 2020), written for the tests from the paper and
the structure of the original code (princeton-vl/RAFT core/), NCHW like the original. Module names match
the original checkpoint (`fnet.layer2.0.downsample.0`, `update_block.mask.2`, ...), so its state dict,
saved with a `module.` prefix, has the key names of `raft-things.pth`.

It uses torch's own grid_sample (align_corners=True, zero padding), avg_pool2d and unfold, i.e. the ops
the original is built on, so that vcjax's gather / reshape formulation is checked against them.
Torch only; never imported by vcjax.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _norm(kind, c):
  return {"batch": lambda: nn.BatchNorm2d(c), "instance": lambda: nn.InstanceNorm2d(c),
          "none": lambda: nn.Sequential()}[kind]()


class ResBlock(nn.Module):
  def __init__(self, cin, cout, kind, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
    self.norm1, self.norm2 = _norm(kind, cout), _norm(kind, cout)
    self.downsample = None
    if stride != 1:
      self.norm3 = _norm(kind, cout)
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride), self.norm3)

  def forward(self, x):
    y = F.relu(self.norm1(self.conv1(x)))
    y = F.relu(self.norm2(self.conv2(y)))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Encoder(nn.Module):
  def __init__(self, out_dim, kind):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
    self.norm1 = _norm(kind, 64)
    self.layer1 = nn.Sequential(ResBlock(64, 64, kind, 1), ResBlock(64, 64, kind, 1))
    self.layer2 = nn.Sequential(ResBlock(64, 96, kind, 2), ResBlock(96, 96, kind, 1))
    self.layer3 = nn.Sequential(ResBlock(96, 128, kind, 2), ResBlock(128, 128, kind, 1))
    self.conv2 = nn.Conv2d(128, out_dim, 1)

  def forward(self, x):
    x = F.relu(self.norm1(self.conv1(x)))
    return self.conv2(self.layer3(self.layer2(self.layer1(x))))


class MotionEncoder(nn.Module):
  def __init__(self, planes):
    super().__init__()
    self.convc1 = nn.Conv2d(planes, 256, 1)
    self.convc2 = nn.Conv2d(256, 192, 3, padding=1)
    self.convf1 = nn.Conv2d(2, 128, 7, padding=3)
    self.convf2 = nn.Conv2d(128, 64, 3, padding=1)
    self.conv = nn.Conv2d(256, 126, 3, padding=1)

  def forward(self, flow, corr):
    c = F.relu(self.convc2(F.relu(self.convc1(corr))))
    f = F.relu(self.convf2(F.relu(self.convf1(flow))))
    return torch.cat([F.relu(self.conv(torch.cat([c, f], 1))), flow], 1)


class SepGRU(nn.Module):
  def __init__(self, hid=128, inp=256):
    super().__init__()
    for s, (k, p) in {"1": ((1, 5), (0, 2)), "2": ((5, 1), (2, 0))}.items():
      for g in "zrq":
        setattr(self, f"conv{g}{s}", nn.Conv2d(hid + inp, hid, k, padding=p))

  def forward(self, h, x):
    for s in "12":
      hx = torch.cat([h, x], 1)
      z = torch.sigmoid(getattr(self, f"convz{s}")(hx))
      r = torch.sigmoid(getattr(self, f"convr{s}")(hx))
      q = torch.tanh(getattr(self, f"convq{s}")(torch.cat([r * h, x], 1)))
      h = (1 - z) * h + z * q
    return h


class Head(nn.Module):
  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(128, 256, 3, padding=1)
    self.conv2 = nn.Conv2d(256, 2, 3, padding=1)

  def forward(self, x):
    return self.conv2(F.relu(self.conv1(x)))


class Update(nn.Module):
  def __init__(self, planes):
    super().__init__()
    self.encoder = MotionEncoder(planes)
    self.gru = SepGRU()
    self.flow_head = Head()
    self.mask = nn.Sequential(nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 576, 1))

  def forward(self, net, inp, corr, flow):
    net = self.gru(net, torch.cat([inp, self.encoder(flow, corr)], 1))
    return net, 0.25 * self.mask(net), self.flow_head(net)


def grid(n, h, w):
  ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
  return torch.stack([xs, ys]).float()[None].repeat(n, 1, 1, 1)  # (N, 2, h, w), x first


class TorchRAFT(nn.Module):
  levels, radius = 4, 4

  def __init__(self):
    super().__init__()
    self.fnet = Encoder(256, "instance")
    self.cnet = Encoder(256, "batch")
    self.update_block = Update(self.levels * (2 * self.radius + 1) ** 2)

  def pyramid(self, f1, f2):
    n, d, h, w = f1.shape
    corr = (f1.flatten(2).transpose(1, 2) @ f2.flatten(2)) / d ** 0.5  # (N, h*w, h*w)
    corr = corr.reshape(n * h * w, 1, h, w)
    out = [corr]
    for _ in range(self.levels - 1):
      corr = F.avg_pool2d(corr, 2, stride=2)
      out.append(corr)
    return out

  def lookup(self, pyr, coords):
    n, _, h, w = coords.shape
    r = self.radius
    d = torch.linspace(-r, r, 2 * r + 1)
    # (2r+1, 2r+1, 2): the first window axis shifts the x coordinate, the second y (as the original).
    delta = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1)
    centre = coords.permute(0, 2, 3, 1).reshape(n * h * w, 1, 1, 2)
    feats = []
    for i, corr in enumerate(pyr):
      pts = centre / 2 ** i + delta[None]
      hh, ww = corr.shape[-2:]
      g = torch.cat([2 * pts[..., :1] / (ww - 1) - 1, 2 * pts[..., 1:] / (hh - 1) - 1], -1)
      feats.append(F.grid_sample(corr, g, align_corners=True).reshape(n, h, w, -1))
    return torch.cat(feats, -1).permute(0, 3, 1, 2)

  @staticmethod
  def upsample(flow, mask):
    n, _, h, w = flow.shape
    m = torch.softmax(mask.view(n, 1, 9, 8, 8, h, w), dim=2)
    nb = F.unfold(8 * flow, [3, 3], padding=1).view(n, 2, 9, 1, 1, h, w)
    up = (m * nb).sum(2).permute(0, 1, 4, 2, 5, 3)
    return up.reshape(n, 2, 8 * h, 8 * w)

  def forward(self, im1, im2, iters=20):
    """im1, im2 `(N, 3, H, W)` in [0, 255] -> the upsampled flow of the last iteration `(N, 2, H, W)`."""
    im1, im2 = 2 * (im1 / 255.0) - 1, 2 * (im2 / 255.0) - 1
    n = im1.shape[0]
    fm = self.fnet(torch.cat([im1, im2]))
    pyr = self.pyramid(fm[:n], fm[n:])
    net, inp = torch.split(self.cnet(im1), [128, 128], dim=1)
    net, inp = torch.tanh(net), torch.relu(inp)
    c0 = grid(n, *fm.shape[-2:])
    c1 = c0.clone()
    for _ in range(iters):
      net, mask, delta = self.update_block(net, inp, self.lookup(pyr, c1), c1 - c0)
      c1 = c1 + delta
    return self.upsample(c1 - c0, mask)


def pad_sintel(*ims):
  """The original InputPadder (sintel mode): replicate-pad to multiples of 8, split evenly."""
  h, w = ims[0].shape[-2:]
  ph, pw = -h % 8, -w % 8
  pad = [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]
  return [F.pad(x, pad, mode="replicate") for x in ims]


def randomized(seed=0):
  """A TorchRAFT with random weights and batch-norm statistics of a sensible scale, in eval mode."""
  from vcjax.testing import randomize_
  torch.manual_seed(seed)
  model = randomize_(TorchRAFT(), seed)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, buf in model.named_buffers():
      if name.endswith("running_mean"):
        buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
      elif name.endswith("running_var"):
        buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))
  return model.eval()


def save_original_format(model, path):
  """torch.save of the state dict under DataParallel's `module.` prefix, as raft-things.pth is stored."""
  torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
