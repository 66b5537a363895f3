"""What the figure tools share (scripts/visualize.py, scripts/caption_pair.py): the attention maps of a
generated caption as grids, and an image panel with a heatmap or a box over it."""
import numpy as np
import torch
from matplotlib.patches import Rectangle

from utils.utils import decode_sequence


def _softmax_mean(scores, steps):
    """Mean over the first ``steps`` decoder steps of softmax(scores) over the grid; scores (L, N)."""
    probs = torch.softmax(scores[:max(steps, 1)].float(), dim=-1)
    return probs.mean(dim=0)


def _word_steps(tokens, idx_to_word):
    """Number of generated words before <END> (the steps whose attention made the caption)."""
    return len(decode_sequence(idx_to_word, tokens.unsqueeze(0))[0].split())


def attention_maps(generated, index, grid, idx_to_word):
    """The attention behind caption ``index`` of ``generated`` (models.captioner.Captions) as (H, W) arrays:
    enc_before and enc_after, the attention each view's grid cells receive from the other view's tokens (None
    without SCORER blocks: the subtraction encoder of models/baselines.py), and decoder, the decoder's attention
    over the grid averaged over the steps that wrote the words."""
    height, width = grid
    att_ba, att_ab = generated.encoder_attention
    steps = _word_steps(generated.tokens[index].cpu(), idx_to_word)

    def received(attention):
        return None if attention is None else attention[index].sum(dim=0).float().view(height, width).cpu().numpy()

    return {"enc_before": received(att_ab), "enc_after": received(att_ba),
            "decoder": _softmax_mean(generated.decoder_attention[index], steps).view(height, width).cpu().numpy()}


def show(ax, image, title=None, heat=None, box=None):
    """An image on ``ax``, with a heatmap (an (H, W) grid over the whole image) and a box (x0, y0, x1, y1)."""
    h, w = image.shape[:2]
    extent = (0, w, h, 0)  # pixel i spans [i, i+1]: heatmap cells and boxes share these units
    ax.imshow(image, extent=extent, interpolation="bilinear")
    if heat is not None:
        # Features come from the whole image resized to a square, so grid cell (r, c) covers
        # rows r*h/H..(r+1)*h/H and columns c*w/W..(c+1)*w/W of the original image.
        span = heat.max() - heat.min()
        norm = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
        ax.imshow(norm, extent=extent, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="nearest")
    if box is not None:
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor="white",
                               linewidth=2.5))
        ax.add_patch(Rectangle((x0, y0), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor="red",
                               linewidth=1.2, linestyle="--"))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=15)
