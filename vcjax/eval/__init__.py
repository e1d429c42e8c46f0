"""The papers' evaluation: CLIP-T, CLIP-I, DINO-I, T.Cons and dynamic degree, torch-free.

`python -m vcjax.eval ...` scores a folder of videos (see `vcjax/eval/__main__.py`);
`python -m vcjax.eval.protocol ...` samples the VideoMaker evaluation prompts and scores them.
Python: `vcjax.eval.score.Scorer`, metrics in `vcjax.eval.metrics`, preprocessing in `vcjax.eval.preprocess`.
"""
