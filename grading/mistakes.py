"""The typical mistakes in the six snippets, each an edit of the solution's block and the hint that
explains it.

grading.recorder runs every mistake on every recorded case and stores its outputs with the hint, so
the checks recognise a mistake by its numbers (in `make snippets` and in the grader) without any
formula of the snippet being shipped. The tests and the grading benchmark make wrong submissions
from the same edits. The edits quote solution lines: this file stays out of the handout and of the
autograder zip.
"""
from dataclasses import dataclass

from grading import GradingError
from grading.snippets import find_blocks

INFO_NCE = ("CBR.CrossEn", "utils.CrossEn")
ATTENTION = ("SelfAttention", "CrossAttention", "Attention")
MERGE = ("context = context.transpose(1, 2).reshape(", "context = context.reshape(")
SOFTMAX = "F.softmax(attention_scores, dim=-1)"
DECODER_PROBS = f"self.dropout({SOFTMAX})"
SCORER_CONTEXT = "self.dropout(attention_probs) @ value_layer"


@dataclass(frozen=True)
class Mistake:
    name: str
    edits: dict  # snippet name -> ((old, new), ...), each old text found once inside the block
    hint: str
    training_only: bool = False  # in evaluation mode it gives the solution's outputs (dropout)


def _each(snippets, *pairs):
    return {name: pairs for name in snippets}


MISTAKES = (
    Mistake("info_nce_over_columns", _each(INFO_NCE, ("dim=-1", "dim=0")),
            "The softmax runs over the columns (dim 0); row k's positive is column k, so each row is "
            "normalised (the last dim)"),
    Mistake("info_nce_sum", _each(INFO_NCE, ("log_probs).mean()", "log_probs).sum()")),
            "This is the sum over the rows; the loss is their mean"),
    Mistake("info_nce_sign", _each(INFO_NCE, ("loss = -torch", "loss = torch")),
            "The sign is flipped: the loss is the mean of -log softmax, a positive number"),
    Mistake("info_nce_no_log", _each(INFO_NCE, ("F.log_softmax(", "F.softmax(")),
            "The probabilities are used without their log: the loss takes -log of the softmax"),
    Mistake("info_nce_both_directions", _each(INFO_NCE, ("loss = -torch.diagonal(log_probs).mean()",
                                                        "loss = -(torch.diagonal(log_probs).mean() + torch.diagonal("
                                                        "F.log_softmax(sim_matrix, dim=0)).mean()) / 2")),
            "This averages the two directions; the block computes one direction (each row against its "
            "column), and its callers average CrossEn(S) and CrossEn(S^T): CBR.forward in models/CBR.py "
            "and CaptionModel.pair_losses in models/captioner.py"),
    Mistake("pe_sin_cos_swapped", {"PositionEncoding": (("pe[:, 0::2] = torch.sin(angle)", "pe[:, 0::2] = torch.cos(angle)"),
                                                        ("pe[:, 1::2] = torch.cos(", "pe[:, 1::2] = torch.sin("))},
            "Sin and cos are swapped: even columns (2i) take sin, odd columns (2i+1) take cos"),
    Mistake("pe_exponent_i", {"PositionEncoding": (("torch.arange(0, n_filters, 2, dtype=torch.float32)",
                                                    "torch.arange(0, (n_filters + 1) // 2, dtype=torch.float32)"),)},
            "The exponent uses i / n_filters; it is 2i / n_filters"),
    Mistake("pe_odd_own_exponent", {"PositionEncoding": (("pe[:, 1::2] = torch.cos(angle[:, :n_filters // 2])",
                                                          "pe[:, 1::2] = torch.cos(position / torch.pow(10000.0, "
                                                          "torch.arange(1, n_filters, 2, dtype=torch.float32) / n_filters))"),)},
            "Column 2i+1 uses the exponent (2i+1) / n_filters; it shares 2i / n_filters with column 2i"),
    Mistake("pe_multiplied", {"PositionEncoding": (("angle = position / torch.pow", "angle = position * torch.pow"),)},
            "The position is multiplied by 10000^(2i/n_filters); it is divided by it"),
    Mistake("pe_from_one", {"PositionEncoding": (("torch.arange(max_len, dtype=torch.float32)",
                                                  "torch.arange(1, max_len + 1, dtype=torch.float32)"),)},
            "Positions start at 0: row 0 of the table is sin(0) = 0 and cos(0) = 1"),
    Mistake("attention_not_scaled", _each(ATTENTION, (" / math.sqrt(self.attention_head_size)", "")),
            "The scores are not divided by sqrt(dh), dh = self.attention_head_size"),
    Mistake("attention_softmax_over_queries", _each(ATTENTION, (SOFTMAX, "F.softmax(attention_scores, dim=-2)")),
            "The softmax runs over the queries (dim -2); it runs over the keys, the last dim, so that each "
            "query's weights sum to 1"),
    Mistake("attention_heads_merged_wrong", _each(ATTENTION, MERGE),
            "The heads are merged in the wrong order: move the head axis next to dh (transpose(1, 2)) "
            "before reshaping to (B, L, d)"),
    Mistake("mask_not_applied", {"SelfAttention": (("attention_scores + attention_mask", "attention_scores"),)},
            "The mask is not applied: attention_mask (0 where a key may be seen, -10000 where not) is added "
            "to the scores before the softmax"),
    Mistake("mask_multiplied", {"SelfAttention": (("attention_scores + attention_mask",
                                                   "attention_scores * attention_mask"),)},
            "The mask is multiplied with the scores; it is added to them (0 where a key may be seen, "
            "-10000 where not)"),
    Mistake("scores_returned_after_softmax", {"CrossAttention": ((f"attention_probs = {DECODER_PROBS}",
                                                                  f"attention_scores = {SOFTMAX}\n        "
                                                                  f"attention_probs = self.dropout(attention_scores)"),)},
            "The returned scores are taken after the softmax; attention_scores keeps the scores before it"),
    Mistake("map_summed_over_heads", {"Attention": (("attention_probs.mean(dim=1)", "attention_probs.sum(dim=1)"),)},
            "The attention map is the sum over the heads; it is their mean"),
    Mistake("map_of_scores", {"Attention": (("attention_map = attention_probs.mean(", "attention_map = attention_scores.mean("),)},
            "The attention map averages the scores; it averages the probabilities (after the softmax)"),
    Mistake("residual_inside_block", {"Attention": (("reshape(B, N, h * dh)", "reshape(B, N, h * dh) + query_states"),)},
            "The residual link is added inside the block; the code after the block adds it (and the LayerNorm)"),
    Mistake("dropout_on_scores", {
        "SelfAttention": ((DECODER_PROBS, "F.softmax(self.dropout(attention_scores), dim=-1)"),),
        "CrossAttention": ((DECODER_PROBS, "F.softmax(self.dropout(attention_scores), dim=-1)"),),
        "Attention": ((f"attention_probs = {SOFTMAX}", "attention_probs = F.softmax(self.dropout(attention_scores), dim=-1)"),
                      (SCORER_CONTEXT, "attention_probs @ value_layer"))},
            "Dropout (self.dropout) is applied to the scores before the softmax; it belongs on the "
            "attention probabilities", training_only=True),
    Mistake("dropout_on_output", {
        "SelfAttention": ((DECODER_PROBS, SOFTMAX), (MERGE[0], "context = self.dropout(context.transpose(1, 2)).reshape(")),
        "CrossAttention": ((DECODER_PROBS, SOFTMAX), (MERGE[0], "context = self.dropout(context.transpose(1, 2)).reshape(")),
        "Attention": ((SCORER_CONTEXT, "attention_probs @ value_layer"),
                      (MERGE[0], "context = self.dropout(context.transpose(1, 2)).reshape("))},
            "Dropout (self.dropout) is applied to the merged output; it belongs on the attention probabilities",
            training_only=True),
    Mistake("dropout_missing", {"SelfAttention": ((DECODER_PROBS, SOFTMAX),), "CrossAttention": ((DECODER_PROBS, SOFTMAX),),
                                "Attention": ((SCORER_CONTEXT, "attention_probs @ value_layer"),)},
            "Dropout (self.dropout) is never applied: in training mode the attention probabilities go through it",
            training_only=True),
    Mistake("map_after_dropout", {"Attention": ((f"attention_probs = {SOFTMAX}", f"attention_probs = self.dropout({SOFTMAX})"),
                                                (SCORER_CONTEXT, "attention_probs @ value_layer"))},
            "The attention map is averaged after self.dropout; it averages the probabilities before "
            "dropout, which only feeds the context", training_only=True),
)


def for_snippet(name):
    return [mistake for mistake in MISTAKES if name in mistake.edits]


def apply(mistake, name, text, rel):
    """The file text with the mistake made in snippet ``name``'s block; GradingError when the
    solution no longer holds a text the mistake edits."""
    owner = name.split(".")[-1]
    blocks = [block for block in find_blocks(text, rel) if block.name == owner]
    if len(blocks) != 1:
        raise GradingError(f"{rel} has no single {owner} block; grading/mistakes.py is out of date")
    lines = text.splitlines(keepends=True)
    head, body, tail = lines[:blocks[0].code_start], "".join(lines[blocks[0].code_start:blocks[0].end]), lines[blocks[0].end:]
    for old, new in mistake.edits[name]:
        if body.count(old) != 1:
            raise GradingError(f"mistake {mistake.name}: {old!r} occurs {body.count(old)} times in the {name} "
                               f"block of {rel}, not once; update grading/mistakes.py to the solution")
        body = body.replace(old, new)
    return "".join(head) + body + "".join(tail)
