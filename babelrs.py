"""BabelRS: language-pivoted pre-training of a ViT for RGB / SAR / infrared detection.

Li et al., "Unifying Heterogeneous Multi-Modal Remote Sensing Detection Via Language-Pivoted
Pretraining", arXiv 2603.01758; official code in the SM3Det repository (`BabelRS_pretrain/`).

Paper -> this file
    Sec. 3.1 CSIA: ViT -> projector -> causal LLM, instruction following on unpaired data   CSIA
    Sec. 3.1 L_align = -Σ_j log P(r_j | q, r_<j, E(x)): CE on answer tokens only            build_conversation, CSIA.forward
    Sec. 3.2 LVSA, α(t) = min(t/τ, 1), F̃ = (1-α)·F_L + α·mean_{l∈S} F_l                    lvsa_alpha, merge_layers
    Tab. 5 / Fig. 5 merge variants: last, concat, sum, per-layer projectors, LVSA           CSIA(merge=...)
    InternVL 2.5 pixel shuffle (2x2 -> 1 token) and projector LN-Linear-GELU-Linear         pixel_shuffle, make_projector
    InternViT-300M (pre-norm, CLS, learned positions, layer scale, drop path)               ViT
    ChatML (InternVL 2.5) template with <img><IMG_CONTEXT>...</img>                         build_conversation
    dynamic tiling (<= 6 tiles of 448 px + thumbnail)                                       dynamic_tiles
    App. D instruction tasks (grounding with counting, referring, classification) built from
    detection sets, one shared concept vocabulary (Sec. 4.1)                                build_instruction_corpus, CONCEPT_MAP
    Sec. 3.3 detection: shared ViT -> ViT-Adapter (spatial prior, injectors / extractors around the
    interaction groups, the last block added to every level) -> neck -> heads               ViTAdapter, adapter_groups, build_detector
    (or a ViTDet-style pyramid reading one block a level, --vit_pyramid simple)           ViTPyramid, group_end_blocks

Differences from the paper / official code
    - LVSA layers default to the official `hidden_states[2, 8, 17, 23]` (outputs of blocks 2, 8,
      17 and 23, counted from 1, so the "last" one is the penultimate block); the paper's reading
      "3rd, 9th, 18th and last" is `--layers 3 9 18 24` (see CSIA's docstring).
    - The detector reads the ViT (without its CLS token) through the official ViT-Adapter
      (`--vit_pyramid adapter`, the babelrs preset; its strides 8, 16, 32 and the neck's 64, where the
      official FPN makes P2-P6 for RGB / IR and P3-P7 for SAR), or, in the tiny preset so far, through
      a ViTDet-style pyramid reading the blocks that end the adapter's groups (`simple`). The heads
      are the detection module's rotated DETR head sets instead of GFL / Oriented R-CNN; the RGB
      × 1.5 loss weight multiplies every DETR loss term (officially the RPN and R-CNN terms).
    - Merge variants (a)-(c) of Tab. 5 are not in the released code; they are built as Fig. 5
      draws them (the concat projector cannot take InternVL's `mlp1`; extra projectors start random).
    - With a system turn first and no `<image>` in the first user turn, the official loader fails an
      assertion; `build_conversation` raises a clear error instead.
    - A random ViT's position and class embeddings start at randn × 0.02 (official randn).

Shape letters: B images (tiles), N tokens, C ViT width, D LLM width, T text length, L layers.

May import: detection, datasets, rotated_ops (DESIGN.md).
"""
import json
import math
import random
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image
from torch import nn

import datasets
import detection
import rotated_ops as ro

IGNORE_INDEX = -100  # label of tokens without loss (system, user turn, image tokens, padding)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# InternVL 2.5's added tokens, plus the ChatML markers of Qwen2
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT,
                  "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
# the `internvl2_5` conversation template's own system message (conversation.py), used by the official
# loader for every sample without a leading system turn
SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
OFFICIAL_LAYERS = (2, 8, 17, 23)  # --vision_select_layer '[2,8,17,23]' of BabelRS_internvl_1b_20ksteps.sh
PAPER_LAYERS = (3, 9, 18, 24)  # Sec. 4.3: "the 3rd, 9th, 18th and last layer" of the 24 blocks


# ---------------------------------------------------------------------------------------------
# The ViT (InternViT parameter names)
# ---------------------------------------------------------------------------------------------

def resize_pos_embed(pos: torch.Tensor, grid: tuple) -> torch.Tensor:
    """(1, G·G', C) patch position embeddings on a square grid -> (1, h·w, C), bicubic."""
    n, c = pos.shape[1], pos.shape[2]
    g = int(round(math.sqrt(n)))
    if (g, g) == tuple(grid):
        return pos
    x = pos.reshape(1, g, g, c).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=grid, mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], c).to(pos.dtype)


class VisionEmbeddings(nn.Module):
    """Patch embedding + learned positions, with a CLS token in front (`cls_token`), or without one
    as the official detection backbone (`InternViTAdapter` deletes `class_embedding` and adds
    `position_embedding[:, 1:]` only). The position table keeps its CLS row either way, so the
    InternViT checkpoints load into both."""

    def __init__(self, dim: int, patch: int, image_size: int, cls_token: bool = True):
        super().__init__()
        self.patch = patch
        self.class_embedding = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if cls_token else None
        self.patch_embedding = nn.Conv2d(3, dim, patch, stride=patch)
        self.position_embedding = nn.Parameter(torch.randn(1, 1 + (image_size // patch) ** 2, dim) * 0.02)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels)  # (B, C, h, w)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)  # (B, h·w, C)
        pos = self.position_embedding
        if self.class_embedding is None:
            return x + resize_pos_embed(pos[:, 1:], grid).to(x.dtype)
        x = torch.cat([self.class_embedding.expand(len(x), -1, -1).to(x.dtype), x], 1)  # (B, 1 + h·w, C)
        return x + torch.cat([pos[:, :1], resize_pos_embed(pos[:, 1:], grid)], 1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, C/H) each
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class QuickGELU(nn.Module):
    """x·σ(1.702x), CLIP's activation."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), QuickGELU() if act == "quick_gelu" else nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block with layer scale and drop path: x + γ1·Attn(LN(x)), then x + γ2·MLP(LN(x))."""

    def __init__(self, dim, heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, ls_init=0.1, act="gelu", eps=1e-6):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)
        self.ls1 = nn.Parameter(ls_init * torch.ones(dim))
        self.ls2 = nn.Parameter(ls_init * torch.ones(dim))
        self.drop_path = drop_path

    def _drop(self, x):  # stochastic depth: drop the residual branch of whole samples
        if not self.training or self.drop_path == 0:
            return x
        keep = torch.rand(len(x), 1, 1, device=x.device) >= self.drop_path
        return x * keep / (1 - self.drop_path)

    def forward(self, x):
        x = x + self._drop(self.attn(self.norm1(x)) * self.ls1)
        return x + self._drop(self.mlp(self.norm2(x)) * self.ls2)


class Encoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class ViT(nn.Module):
    """A plain pre-norm ViT whose state dict is InternViT's: the released
    `BabelRS_ViT-300M.safetensors` and the `vision_model.*` tensors of InternVL2.5-1B load with
    strict=True (`load_vit_weights` strips the prefix). Inputs of any size: position embeddings are
    resized bicubically to the patch grid.

    `forward` returns all hidden states, index 0 = embedding output, index k = output of block k,
    as InternViT's `output_hidden_states=True`; each (B, P + N, C) with P = `num_prefix` (1 with the
    CLS token, 0 without: `cls_token=False` is the detection backbone). `act`, `pre_norm` (a
    LayerNorm on the embeddings) and `eps` let the same class hold CLIP and DINOv2 ViTs (Tab. 3
    baselines, `convert_hf_vit`).
    """

    def __init__(self, dim=1024, depth=24, heads=16, patch=14, image_size=448, mlp_ratio=4.0, qkv_bias=True,
                 drop_path=0.0, ls_init=0.1, grad_checkpoint=False, act="gelu", pre_norm=False, eps=1e-6,
                 cls_token=True):
        super().__init__()
        self.dim, self.depth, self.patch = dim, depth, patch
        self.num_prefix = int(cls_token)
        self.embeddings = VisionEmbeddings(dim, patch, image_size, cls_token)
        self.embeddings_norm = nn.LayerNorm(dim, eps=eps) if pre_norm else None  # CLIP's pre_layrnorm
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear over depth
        self.encoder = Encoder([Block(dim, heads, mlp_ratio, qkv_bias, r, ls_init, act, eps) for r in rates])
        self.grad_checkpoint = grad_checkpoint
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, pixels: torch.Tensor) -> list:
        """(B, 3, H, W) -> list of depth + 1 tensors (B, P + N, C)."""
        x = self.embeddings(pixels)
        if self.embeddings_norm is not None:
            x = self.embeddings_norm(x)
        hidden = [x]
        for block in self.encoder.layers:
            if self.grad_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            hidden.append(x)
        return hidden


VIT_FAMILIES = {  # ViT options of each weight family (Tab. 3 baselines through `transformers` checkpoints)
    "internvit": dict(),
    "clip": dict(act="quick_gelu", pre_norm=True, eps=1e-5, ls_init=1.0),
    "dinov2": dict(eps=1e-6, ls_init=1.0),
}


class ViTClassifier(nn.Module):
    """The InternViT-named ViT with a classification head on the mean patch token: the formula-driven
    stand-in's pre-training (train.py --stage fractal)."""

    def __init__(self, dim: int, depth: int, heads: int, patch: int, image_size: int, classes: int):
        super().__init__()
        self.vit = ViT(dim, depth, heads, patch, image_size)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images):  # (B, 3, H, W) -> (B, classes)
        return self.head(self.norm(self.vit(images)[-1][:, self.vit.num_prefix:].mean(1)))


def convert_hf_vit(state: dict, family: str) -> dict:
    """A `transformers` CLIP vision tower or DINOv2 state dict -> InternViT names (q, k, v stacked
    into qkv; CLIP's missing patch bias set to 0 and its absent layer scale to 1). Final norms
    (`post_layernorm`, `layernorm`) and DINOv2's mask token are not part of the backbone."""
    if family == "internvit":
        return state
    if family not in VIT_FAMILIES:
        raise ValueError(f"unknown ViT family {family!r}; choose from {list(VIT_FAMILIES)}")
    if family == "clip":
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
        dim = state["embeddings.class_embedding"].shape[-1]
        out = {"embeddings.class_embedding": state["embeddings.class_embedding"].reshape(1, 1, dim),
               "embeddings.patch_embedding.weight": state["embeddings.patch_embedding.weight"],
               "embeddings.patch_embedding.bias": torch.zeros(dim),
               "embeddings.position_embedding": state["embeddings.position_embedding.weight"][None],
               "embeddings_norm.weight": state["pre_layrnorm.weight"], "embeddings_norm.bias": state["pre_layrnorm.bias"]}
        layer, names = "encoder.layers.{}.", dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                                                   o="self_attn.out_proj", n1="layer_norm1", n2="layer_norm2")
    else:
        state = {k.removeprefix("dinov2."): v for k, v in state.items()}
        old = any(".attention.attention.query." in k for k in state)  # hub checkpoints before transformers 5
        dim = state["embeddings.cls_token"].shape[-1]
        out = {"embeddings.class_embedding": state["embeddings.cls_token"],
               "embeddings.patch_embedding.weight": state["embeddings.patch_embeddings.projection.weight"],
               "embeddings.patch_embedding.bias": state["embeddings.patch_embeddings.projection.bias"],
               "embeddings.position_embedding": state["embeddings.position_embeddings"]}
        layer = "encoder.layer.{}."
        names = dict(q="attention.attention.query", k="attention.attention.key", v="attention.attention.value",
                     o="attention.output.dense") if old else dict(q="attention.q_proj", k="attention.k_proj",
                                                                  v="attention.v_proj", o="attention.o_proj")
        names.update(n1="norm1", n2="norm2")
    prefix = layer.split("{}")[0]
    depth = 1 + max(int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix))
    for i in range(depth):
        src, dst = layer.format(i), f"encoder.layers.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.qkv.{p}"] = torch.cat([state[src + names[n] + f".{p}"] for n in "qkv"])
            out[dst + f"attn.proj.{p}"] = state[src + names["o"] + f".{p}"]
            out[dst + f"norm1.{p}"] = state[src + names["n1"] + f".{p}"]
            out[dst + f"norm2.{p}"] = state[src + names["n2"] + f".{p}"]
            out[dst + f"mlp.fc1.{p}"] = state[src + f"mlp.fc1.{p}"]
            out[dst + f"mlp.fc2.{p}"] = state[src + f"mlp.fc2.{p}"]
        if family == "dinov2":
            out[dst + "ls1"] = state[src + "layer_scale1.lambda1"]
            out[dst + "ls2"] = state[src + "layer_scale2.lambda1"]
        else:
            out[dst + "ls1"] = out[dst + "ls2"] = torch.ones(dim)
    return out


def load_vit_weights(vit: ViT, path: str, patch_resize: bool = True, family: str = "internvit") -> None:
    """Load InternViT-named weights strictly: a `.safetensors` file (the released BabelRS ViT, or
    an InternVL checkpoint file whose `vision_model.` tensors are taken), or a folder holding
    `model.safetensors` (InternVL2.5-1B, or a `csia` run); with `family` "clip" or "dinov2", a
    `transformers` CLIP vision / DINOv2 checkpoint through `convert_hf_vit`. A patch kernel of another size is
    resized bicubically (BabelRS's detector loads the 14-px kernel into 16-px patches)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights found")
    state = {}
    for f in files:  # safetensors, or a torch file read with weights_only=True: never code from a file
        state.update(detection.load_state_file(str(f)))
    state = convert_hf_vit(state, family)
    for prefix in ("vision_model.", "vit.", "backbone.vit."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    if vit.embeddings.class_embedding is None:  # the detection ViT has no CLS token (official adapter)
        state.pop("embeddings.class_embedding", None)
    kernel = state.get("embeddings.patch_embedding.weight")
    if kernel is not None and patch_resize and kernel.shape[-1] != vit.patch:
        state["embeddings.patch_embedding.weight"] = F.interpolate(
            kernel.float(), size=(vit.patch, vit.patch), mode="bicubic", align_corners=False).to(kernel.dtype)
    pos = state.get("embeddings.position_embedding")
    if pos is not None and pos.shape != vit.embeddings.position_embedding.shape:
        g = int(round(math.sqrt(vit.embeddings.position_embedding.shape[1] - 1)))
        state["embeddings.position_embedding"] = torch.cat([pos[:, :1], resize_pos_embed(pos[:, 1:], (g, g))], 1)
    try:
        vit.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: not an InternViT checkpoint of this size ({str(e).splitlines()[1].strip()})") from None


# ---------------------------------------------------------------------------------------------
# LVSA, pixel shuffle, projector (Sec. 3.2)
# ---------------------------------------------------------------------------------------------

def lvsa_alpha(step: int, tau: float) -> float:
    """Eq. α(t) = min(t / τ, 1): 0 at the start (last layer only), 1 after τ steps (plain mean)."""
    return 1.0 if tau <= 0 else min(step / tau, 1.0)


def merge_layers(hidden: list, layers: tuple, alpha: float) -> torch.Tensor:
    """Eq. F̃ = (1 - α)·F_L + α·(1/|S|)·Σ_{l∈S} F_l, with F_L = hidden[layers[-1]]: (B, N, C)."""
    selected = [hidden[l] for l in layers]
    return (1 - alpha) * selected[-1] + alpha * torch.stack(selected).mean(0)


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """InternVL's pixel shuffle (ps_version v2): (B, h, w, C) -> (B, h/2, w/2, 4C), each output token
    the 2x2 neighbourhood's channels, in the exact channel order of InternVL's projector weights."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def make_projector(in_dim: int, llm_dim: int) -> nn.Sequential:
    """InternVL's `mlp1`: LayerNorm -> Linear -> GELU -> Linear (indices 0, 1, 3 as in its checkpoints)."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))


# ---------------------------------------------------------------------------------------------
# Conversations, tokenizer, instruction data
# ---------------------------------------------------------------------------------------------

def build_conversation(tokenizer, conversations: list, num_image_tokens: int, system: str = SYSTEM_MESSAGE,
                       max_length: int = 0):
    """ChatML (InternVL 2.5) tokens and labels of a conversation, as the official loader builds them
    (`multi_modal_get_item` + `preprocess_internvl2_5`):

        <|im_start|>system\n{system}<|im_end|>\n
        <|im_start|>user\n<img><IMG_CONTEXT>×n</img>\n{question}<|im_end|>\n
        <|im_start|>assistant\n{answer}<|im_end|>\n        (and further rounds)

    - when the first turn holds no `<image>`, `<image>\n` is put in front of it, even when that
      turn is a system turn (the official loader looks at turn 0 only; the placeholder then stays
      plain text in the system message, and the user turn must hold its own `<image>`);
    - a leading `system` turn replaces the template's system message;
    - one `<image>` is replaced by the image's tokens (one image a sample): the first one in a
      user turn; any further `<image>` stays plain text, as in the official loader.
    Labels are IGNORE_INDEX everywhere except the answer tokens and their `<|im_end|>` (Sec. 3.1:
    "the language modeling loss is applied only to the response tokens").
    Returns (input_ids (T,), labels (T,)) as long tensors.
    """
    image = IMG_START + IMG_CONTEXT * num_image_tokens + IMG_END
    turns = [dict(t) for t in conversations]
    if turns and "<image>" not in turns[0]["value"]:  # internvl_chat_finetune.py `multi_modal_get_item`
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
    if turns and turns[0]["from"] == "system":
        system, turns = turns[0]["value"], turns[1:]
    if len(turns) % 2 or any(t["from"] != ("human", "gpt")[i % 2] for i, t in enumerate(turns)):
        raise ValueError("a conversation alternates human and gpt turns, starting with human "
                         "(after an optional system turn)")
    if not any("<image>" in t["value"] for t in turns[::2]):
        raise ValueError("no <image> in any user turn (with a leading system turn, the first user turn needs one)")
    placed = False
    pieces = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)]
    for i in range(0, len(turns), 2):
        question = turns[i]["value"]
        if not placed and "<image>" in question:
            question, placed = question.replace("<image>", image, 1), True
        pieces.append((f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", False))
        pieces.append((turns[i + 1]["value"] + "<|im_end|>", True))
        pieces.append(("\n", False))
    ids, labels = [], []
    for text, supervised in pieces:
        tok = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += tok
        labels += tok if supervised else [IGNORE_INDEX] * len(tok)
    if max_length and len(ids) > max_length:
        end_img = tokenizer.convert_tokens_to_ids(IMG_END)
        last_img = max((i for i, t in enumerate(ids) if t == end_img), default=-1)
        if last_img >= max_length:
            # the cut would split an image: keep the images whole and drop the sample's loss (the
            # official loader multiplies such a sample's loss by 0)
            ids, labels = ids[:last_img + 1], [IGNORE_INDEX] * (last_img + 1)
        else:
            ids, labels = ids[:max_length], labels[:max_length]
    return torch.tensor(ids), torch.tensor(labels)


def build_tokenizer(texts: list, vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained offline on `texts` (the instruction corpus), with the
    ChatML and InternVL special tokens: the tiny preset's stand-in for Qwen2's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:])


def resize_like_pil(image: torch.Tensor, size: tuple) -> torch.Tensor:
    """(3, H, W) float in 0-255 -> (3, h, w): bicubic with antialiasing, rounded and clipped to
    uint8 values, which is what the official loader's PIL `Image.resize` (bicubic) returns."""
    out = F.interpolate(image[None].float(), size=size, mode="bicubic", align_corners=False, antialias=True)[0]
    return out.round().clamp(0, 255)


def dynamic_tiles(image: torch.Tensor, size: int, max_tiles: int = 6, thumbnail: bool = True) -> torch.Tensor:
    """InternVL's dynamic tiling: resize to the (i·size, j·size) grid with i·j <= max_tiles whose
    aspect ratio is closest to the image's (ties: the larger grid when the image is large enough),
    cut it into size x size tiles, and add a size x size thumbnail when there are several tiles.
    Resizing is antialiased as PIL's (`resize_like_pil`). (3, H, W) 0-255 -> (n, 3, size, size)."""
    h, w = image.shape[-2:]
    ratio = w / h
    grids = sorted({(i, j) for n in range(1, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                    if i * j <= max_tiles}, key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for i, j in grids:  # i columns, j rows
        diff = abs(ratio - i / j)
        if diff < best_diff or (diff == best_diff and w * h > 0.5 * size * size * i * j):
            best, best_diff = (i, j), diff
    cols, rows = best
    resized = resize_like_pil(image, (rows * size, cols * size))
    tiles = [resized[:, r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)]
    if thumbnail and len(tiles) > 1:
        tiles.append(resize_like_pil(image, (size, size)))
    return torch.stack(tiles)


MAX_REPEAT = 1000  # repeat_time beyond this is a corrupted meta file (the official mixes use up to 3)


def read_instruction_meta(path) -> list:
    """The sources of an instruction mix (the official `BabelRS_ft_data_instruct.json` layout):
    {name: {root, annotation, modality, repeat_time}}. As the official loader: `annotation` is
    opened as given (relative to the working folder), `root` is the folder of the images only. For
    meta files that live beside their data (SynthSOI's), a relative path that does not exist from
    the working folder is taken from the meta file's folder. repeat_time < 1 keeps the first
    fraction of a file, an integer > 1 repeats it (as the official loader). Returns a list of
    dict(image path, conversations, modality, source)."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise datasets.DatasetError(f"{path}: cannot read the instruction meta file ({e})") from None
    if not isinstance(meta, dict):
        raise datasets.DatasetError(f"{path}: expected {{name: {{root, annotation, ...}}}}, got a {type(meta).__name__}")
    records = []
    for name, src in meta.items():
        for key in ("root", "annotation"):
            if not isinstance(src, dict) or not isinstance(src.get(key), str):
                raise datasets.DatasetError(f"{path}: source {name!r} has no {key!r} path")
        root, ann = Path(src["root"]), Path(src["annotation"])
        if not root.is_absolute() and not root.is_dir() and (path.parent / root).is_dir():
            root = path.parent / root
        if not ann.is_absolute() and not ann.is_file() and (path.parent / ann).is_file():
            ann = path.parent / ann
        if not ann.is_file():
            raise datasets.DatasetError(f"{path}: source {name!r}: annotation file {ann} not found")
        rows = datasets.read_instruction_jsonl(ann)
        try:
            rep = float(src.get("repeat_time", 1))
        except (TypeError, ValueError):
            rep = math.nan
        if not math.isfinite(rep) or not 0 < rep <= MAX_REPEAT:
            raise datasets.DatasetError(f"{path}: source {name!r}: repeat_time must be a number in (0, {MAX_REPEAT}]")
        if rep < 1:
            rows = rows[:max(1, int(len(rows) * rep))]
        elif rep != int(rep):
            raise datasets.DatasetError(f"{path}: source {name!r}: repeat_time above 1 must be an integer, got {rep}")
        else:
            rows = rows * int(rep)
        modality = src.get("modality", "rgb")
        if modality not in ("rgb", "sar", "ir"):
            raise datasets.DatasetError(f"{path}: source {name!r}: modality must be rgb, sar or ir, got {modality!r}")
        records += [dict(image=root / r["image"], conversations=r["conversations"], modality=modality, source=name)
                    for r in rows]
    return records


def shuffle_answers(records: list, seed: int = 0) -> list:
    """A control the papers do not run (tiny protocol v3): every assistant turn of the corpus gets the
    text of another, drawn by a seeded permutation over all assistant turns; images, prompts and the
    set of answers stay, only which answer goes with which image changes. CSIA against this control
    separates what the language carries about the image from what the images and prompts alone give."""
    turns = [(i, j) for i, r in enumerate(records) for j, t in enumerate(r["conversations"]) if t["from"] == "gpt"]
    order = torch.randperm(len(turns), generator=torch.Generator().manual_seed(seed)).tolist()
    out = [dict(r, conversations=[dict(t) for t in r["conversations"]]) for r in records]
    for (i, j), k in zip(turns, order):
        a, b = turns[k]
        out[i]["conversations"][j]["value"] = records[a]["conversations"][b]["value"]
    return out


class InstructionDataset(torch.utils.data.Dataset):
    """Instruction samples as (pixel tiles, token ids, labels). Images are resized to one tile of
    `image_size` (or dynamically tiled), normalised with ImageNet statistics."""

    def __init__(self, records: list, tokenizer, image_size: int, tokens_per_tile: int, max_tiles: int = 1,
                 max_length: int = 0):
        self.records, self.tokenizer = records, tokenizer
        self.image_size, self.tokens_per_tile, self.max_tiles, self.max_length = image_size, tokens_per_tile, max_tiles, max_length

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        image = torch.from_numpy(datasets.load_image(r["image"])).permute(2, 0, 1).float()  # (3, H, W) 0-255
        if self.max_tiles > 1:
            tiles = dynamic_tiles(image, self.image_size, self.max_tiles)
        else:
            tiles = resize_like_pil(image, (self.image_size, self.image_size))[None]
        mean = torch.tensor(datasets.IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(datasets.IMAGENET_STD).view(3, 1, 1)
        tiles = (tiles - mean) / std  # (n, 3, S, S)
        ids, labels = build_conversation(self.tokenizer, r["conversations"], self.tokens_per_tile * len(tiles),
                                         max_length=self.max_length)
        return dict(pixels=tiles, input_ids=ids, labels=labels, modality=r["modality"])


def collate_instructions(items: list, pad_id: int) -> dict:
    """Right-pad token sequences; concatenate the tiles of all samples in order."""
    T = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    labels = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(items), T, dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = it["input_ids"], it["labels"], 1
    return dict(pixels=torch.cat([it["pixels"] for it in items]), input_ids=ids, labels=labels, attention_mask=mask,
                modality=[it["modality"] for it in items])


class InstructionBatches(torch.utils.data.Dataset):
    """Step k's `accum` micro-batches, determined by k alone (sampler draws k·accum + a)."""

    def __init__(self, data, sampler, accum: int, pad_id: int):  # sampler: datasets.MultiSourceSampler
        self.data, self.sampler, self.accum, self.pad_id = data, sampler, accum, pad_id

    def __len__(self):
        return 1 << 62

    def __getitem__(self, k: int) -> list:
        return [collate_instructions([self.data[i] for _, i in self.sampler.batch(k * self.accum + a)],
                                     self.pad_id) for a in range(self.accum)]


def load_tokenizer(run_dir, records: list, llm: str = "", vocab_size: int = 1024):
    """The LLM's own tokenizer (`llm`: its folder; InternVL's tokens added), or one trained on the
    instruction `records` (tiny preset, `vocab_size` tokens); either is stored in `run_dir/tokenizer`
    and reloaded from there on resume."""
    from transformers import AutoTokenizer
    stored = Path(run_dir) / "tokenizer"
    if (stored / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(stored), local_files_only=True)
    if llm:
        tok = AutoTokenizer.from_pretrained(llm, local_files_only=True)
        tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]})
    else:
        # the system message opens every sample: weigh it so, and the tokenizer learns it as a few tokens
        texts = [SYSTEM_MESSAGE] * len(records) + [t["value"] for r in records for t in r["conversations"]]
        tok = build_tokenizer(texts, vocab_size)
    tok.save_pretrained(str(stored))
    return tok


# ---------------------------------------------------------------------------------------------
# CSIA instruction corpus from detection sets (App. D task types)
# ---------------------------------------------------------------------------------------------

# Class names of the detection sets -> the shared concepts of the corpus (BabelRS Sec. 4.1: "unified
# naming conventions for shared concepts"). Keys are lower case; a name not listed is used as it
# is, lower case, with '-' and '_' as spaces. `--concept_map FILE.json` adds to or overrides it.
CONCEPT_MAP = {
    # DOTA-v1.0 / v1.5
    "plane": "plane", "ship": "ship", "storage-tank": "tank", "harbor": "harbor", "bridge": "bridge",
    "small-vehicle": "vehicle", "large-vehicle": "vehicle", "helicopter": "helicopter",
    "baseball-diamond": "baseball field", "tennis-court": "tennis court", "basketball-court": "basketball court",
    "ground-track-field": "ground track field", "soccer-ball-field": "soccer field", "roundabout": "roundabout",
    "swimming-pool": "swimming pool", "container-crane": "container crane",
    # DIOR-R
    "airplane": "plane", "storagetank": "tank", "vehicle": "vehicle", "baseballfield": "baseball field",
    "basketballcourt": "basketball court", "tenniscourt": "tennis court", "groundtrackfield": "ground track field",
    "golffield": "golf field", "trainstation": "train station", "expressway-service-area": "expressway service area",
    "expressway-toll-station": "expressway toll station",
    # SARDet-100K / SARDet-50K
    "aircraft": "plane", "car": "vehicle", "tank": "tank",
    # DroneVehicle (infrared)
    "truck": "vehicle", "bus": "vehicle", "van": "vehicle", "feright_car": "vehicle", "freight_car": "vehicle",
    "freight car": "vehicle",
}
MODALITY_NAMES = {"rgb": "optical", "sar": "SAR", "ir": "infrared"}
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
            "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")


def concept_of(name: str, mapping: dict = None) -> str:
    """A data set's class name -> its shared concept (CONCEPT_MAP, then `mapping` on top)."""
    table = dict(CONCEPT_MAP, **{k.lower(): v for k, v in (mapping or {}).items()})
    key = name.strip().lower()
    return table.get(key, key.replace("_", " ").replace("-", " "))


def _count(n: int, concept: str) -> str:
    word = _NUMBERS[n] if n < len(_NUMBERS) else str(n)
    plural = concept if n == 1 else (concept + "es" if concept.endswith(("s", "sh", "ch", "x")) else concept + "s")
    return f"{word} {plural}"


def _article(concept: str) -> str:
    return ("An " if concept[0] in "aeiou" else "A ") + concept


def box_to_1000(xyxy: np.ndarray, width: int, height: int) -> str:
    """A horizontal box in pixels -> InternVL's `[[x1, y1, x2, y2]]` in 0-1000 of the image, clipped."""
    x1, y1, x2, y2 = (min(max(v / s, 0.0), 1.0) * 1000 for v, s in zip(xyxy, (width, height, width, height)))
    return "[[" + ", ".join(str(int(round(v))) for v in (x1, y1, x2, y2)) + "]]"


def detection_instructions(image: str, width: int, height: int, concepts: list, boxes: np.ndarray, modality: str,
                           vocabulary: list, rng: random.Random, referring: int = 1) -> list:
    """The App. D tasks for one annotated image, as InternVL jsonl rows:
    - grounding with counting: "Detect all objects shown in this {modality} image and describe using
      horizontal bounding box. If an object category appears more than once, output the quantity
      only." -> "There are N objects in the image, including <counts, and the box of each single one>.";
    - visual referring, for `referring` random objects: "What is the category visible in the area
      <box>[[x1, y1, x2, y2]]</box>? The classes are: ..." -> "A ship.";
    - image-level classification: which of the vocabulary's concepts the image holds.
    concepts: per object its shared concept; boxes (N, 4) xyxy pixels; vocabulary: the modality's concepts."""
    name = MODALITY_NAMES[modality]
    rows = []

    def add(question, answer):
        rows.append({"image": image, "width": width, "height": height,
                     "conversations": [{"from": "human", "value": "<image>\n" + question},
                                       {"from": "gpt", "value": answer}]})

    counts = {}
    for c in concepts:
        counts[c] = counts.get(c, 0) + 1
    if concepts:
        parts = []
        for c in sorted(counts):
            if counts[c] == 1:
                parts.append(f"{_article(c).lower()} <box>{box_to_1000(boxes[concepts.index(c)], width, height)}</box>")
            else:
                parts.append(_count(counts[c], c))
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        answer = (f"There {'is' if len(concepts) == 1 else 'are'} {_count(len(concepts), 'object')} in the image, "
                  f"including {listed}.")
    else:
        answer = "There are no objects in the image."
    add(f"Detect all objects shown in this {name} image and describe using horizontal bounding box. If an object "
        "category appears more than once, output the quantity only.", answer)
    classes = ", ".join(vocabulary)
    for k in rng.sample(range(len(concepts)), min(referring, len(concepts))):
        add(f"What is the category visible in the area <box>{box_to_1000(boxes[k], width, height)}</box>? "
            f"The classes are: {classes}.", f"{_article(concepts[k])}.")
    present = sorted(counts)
    add(f"Which of these categories can be seen in this {name} image? The classes are: {classes}. "
        "Answer with the categories present.",
        (", ".join(present) + ".") if present else "None of them.")
    return rows


def instruction_sources(entries: list) -> list:
    """`--data MODALITY:PATH ...` of the csia stage -> [(modality, train split folder)], checked."""
    sources = []
    for e in entries:
        modality, sep, path = e.partition(":")
        if not sep or modality not in ("rgb", "sar", "ir"):
            raise datasets.DatasetError(f"--data {e!r}: expected one meta .json, or MODALITY:PATH detection folders "
                                        "with MODALITY one of rgb, sar, ir")
        if not Path(path).is_dir():
            raise datasets.DatasetError(f"{path}: no such folder (from --data {e})")
        sources.append((modality, datasets.find_split(path, "train")))
    return sources


def build_instruction_corpus(sources: list, out_dir, rates: dict = None, concept_map: dict = None, seed: int = 0,
                             referring: int = 1) -> Path:
    """An InternVL-format instruction corpus (the layout `--stage csia --data` reads) from detection
    splits: `out_dir/{modality}.jsonl` + `out_dir/meta.json` (absolute paths; `repeat_time` from
    `rates`, the sample rate of each modality). sources: list of (modality, split folder) in any
    format `datasets.load_detection_split` reads (DOTA, DIOR-R, COCO / SARDet, DroneVehicle). Written
    atomically; deterministic from `seed`. Returns the meta file."""
    out_dir = Path(out_dir)
    rates = rates or {}
    by_modality = {}
    for modality, split_dir in sources:
        ds = datasets.load_detection_split(split_dir, modality)
        by_modality.setdefault(modality, []).append(ds)
    meta = {}
    for modality, splits in by_modality.items():
        rng = random.Random(f"{seed}-{modality}")
        vocabulary = sorted({concept_of(c, concept_map) for ds in splits for c in ds.classes})
        rows = []
        for ds in splits:
            clipped = dropped = 0
            for s in ds.samples:
                with Image.open(s.image) as im:
                    width, height = im.size
                # InternVL's boxes are horizontal, in 0-1000 of the image: a box reaching past the image is
                # clipped to it, one wholly outside (nothing of it visible) is left out of the answers
                xyxy = ro.obb2hbb(torch.from_numpy(s.boxes).double()).numpy()
                inside = np.clip(xyxy, 0, [width, height, width, height])
                visible = (inside[:, 2] - inside[:, 0] >= 1) & (inside[:, 3] - inside[:, 1] >= 1)
                clipped += int((visible & (np.abs(inside - xyxy) > 1).any(1)).sum())
                dropped += int((~visible).sum())
                concepts = [concept_of(ds.classes[int(l)], concept_map) for l, v in zip(s.labels, visible) if v]
                rows += detection_instructions(str(Path(s.image).resolve()), width, height, concepts, inside[visible],
                                               modality, vocabulary, rng, referring)
            notes = [n for n in (ds.report(), f"{clipped} boxes clipped to their image" if clipped else "",
                                 f"{dropped} boxes wholly outside their image left out" if dropped else "") if n]
            if notes:
                print(f"csia corpus, {ds.root}: " + "; ".join(n.removeprefix(f"{ds.root}: ") for n in notes))
        ann = out_dir / f"{modality}.jsonl"
        datasets.atomic_write_text(ann, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        meta[f"detections_{modality}"] = dict(root="/", annotation=str(ann.resolve()), modality=modality,
                                              repeat_time=rates.get(modality, 1.0), length=len(rows))
    meta_path = out_dir / "meta.json"
    datasets.atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return meta_path


def corpus_from_detection_sets(sources: list, out: Path, rates: dict, concept_map: str = "", seed: int = 0) -> Path:
    """`--stage csia --data MODALITY:PATH ...`: the App. D corpus of those detection sets in `out`, with
    the modality sample `rates` and a `concept_map` json file on top of CONCEPT_MAP."""
    mapping = {}
    if concept_map:
        try:
            mapping = json.loads(Path(concept_map).read_text())
        except (OSError, ValueError) as e:
            raise datasets.DatasetError(f"{concept_map}: cannot read the concept map ({e})") from None
    meta = build_instruction_corpus(sources, out, rates, mapping, seed)
    print(f"csia: instruction corpus from {len(sources)} detection sets written to {out}")
    return meta


# ---------------------------------------------------------------------------------------------
# CSIA: the alignment pre-training model (Sec. 3.1 + 3.2)
# ---------------------------------------------------------------------------------------------

class CSIA(nn.Module):
    """ViT -> layer merge (LVSA by default) -> CLS dropped -> pixel shuffle -> projector -> visual
    tokens in place of the <IMG_CONTEXT> placeholders -> causal LM -> L_align.

    `merge` (Tab. 5, Fig. 5):
        "last"       the final block only (vanilla InternVL, the baseline row);
        "concat"     (a) the selected layers concatenated along channels before one projector;
        "sum"        (b) their element-wise sum before one projector;
        "per-layer"  (c) one projector per layer, outputs weighted by LVSA and summed;
        "lvsa"       (d) LVSA then one shared projector (BabelRS).
    `layers` are hidden-state indices (0 = embeddings, k = block k). The official script uses
    (2, 8, 17, 23), i.e. the outputs of blocks 2, 8, 17 and 23 of 24, so its "last" feature is the
    penultimate block and block 24 gets no gradient; the paper's text says "3rd, 9th, 18th and
    last" = (3, 9, 18, 24). We default to the official indices (they produced the released model).
    Everything trains; nothing is frozen (official script: freeze_llm/mlp/backbone all False).
    """

    def __init__(self, vit: ViT, llm: nn.Module, img_context_id: int,
                 merge: Literal["last", "concat", "sum", "per-layer", "lvsa"] = "lvsa",
                 layers: tuple = OFFICIAL_LAYERS, tau: float = 6000.0):
        super().__init__()
        if merge not in ("last", "concat", "sum", "per-layer", "lvsa"):
            raise ValueError(f"unknown merge {merge!r}")
        if max(layers) > vit.depth or min(layers) < 0:
            raise ValueError(f"layers {layers} outside the ViT's hidden states 0..{vit.depth}")
        self.vit, self.llm, self.img_context_id = vit, llm, img_context_id
        self.merge, self.layers, self.tau = merge, tuple(layers), tau
        llm_dim = llm.get_input_embeddings().embedding_dim
        n_proj = len(layers) if merge == "per-layer" else 1
        in_dim = 4 * vit.dim * (len(layers) if merge == "concat" else 1)
        projectors = [make_projector(in_dim, llm_dim) for _ in range(n_proj)]
        self.mlp1 = projectors[0]  # InternVL's name, so its `mlp1` weights load
        self.extra_projectors = nn.ModuleList(projectors[1:])

    def _shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + h·w, C) -> (B, h·w/4, 4C): CLS dropped, 2x2 pixel shuffle."""
        x = x[:, self.vit.num_prefix:]
        g = int(round(math.sqrt(x.shape[1])))
        return pixel_shuffle(x.reshape(len(x), g, g, -1)).flatten(1, 2)

    def visual_tokens(self, pixels: torch.Tensor, step: int) -> torch.Tensor:
        """(B, 3, S, S) tiles -> (B, N, D) visual tokens for the LLM, merged as `merge` says."""
        hidden = self.vit(pixels)
        alpha = lvsa_alpha(step, self.tau)
        if self.merge == "last":
            return self.mlp1(self._shuffle(hidden[-1]))
        if self.merge == "lvsa":
            return self.mlp1(self._shuffle(merge_layers(hidden, self.layers, alpha)))
        if self.merge == "sum":
            return self.mlp1(self._shuffle(torch.stack([hidden[l] for l in self.layers]).sum(0)))
        if self.merge == "concat":
            return self.mlp1(self._shuffle(torch.cat([hidden[l] for l in self.layers], -1)))
        # per-layer projectors, weighted as LVSA: (1 - α + α/|S|) for the last layer, α/|S| for the others
        projectors = [self.mlp1, *self.extra_projectors]
        n = len(self.layers)
        weights = [alpha / n] * (n - 1) + [1 - alpha + alpha / n]
        return sum(w * p(self._shuffle(hidden[l])) for w, p, l in zip(weights, projectors[1:] + projectors[:1],
                                                                     self.layers))

    def forward(self, pixels, input_ids, attention_mask, labels, step: int = 0) -> dict:
        """
        Args:
            pixels: (B_tiles, 3, S, S) all tiles of the batch, in sample order; input_ids, labels,
            attention_mask: (B, T) with one <IMG_CONTEXT> per visual token; step: the optimizer
            step t of α(t).
        Returns:
            dict(loss = L_align (mean CE over supervised tokens), alpha = α(t)).
        """
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, D)
        visual = self.visual_tokens(pixels, step).flatten(0, 1)  # (B_tiles·N, D)
        slots = input_ids == self.img_context_id
        if int(slots.sum()) != len(visual):
            raise ValueError(f"{int(slots.sum())} <IMG_CONTEXT> tokens for {len(visual)} visual tokens "
                             f"(truncated by max_length?)")
        embeds = embeds.masked_scatter(slots[..., None], visual.to(embeds.dtype))
        logits = self.llm(inputs_embeds=embeds, attention_mask=attention_mask).logits  # (B, T, V)
        # Sec. 3.1: L_align = -Σ_j log P(r_j | q, r_<j, E(x)), averaged over answer tokens
        targets = labels[:, 1:].flatten()
        if (targets == IGNORE_INDEX).all():  # nothing supervised in this micro-batch (all cut by max_length)
            return dict(loss=logits.sum() * 0.0, alpha=lvsa_alpha(step, self.tau))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX)
        return dict(loss=loss, alpha=lvsa_alpha(step, self.tau))


def build_llm(path: str = "", vocab_size: int = 0, dim: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
              ffn: int = 128):
    """The causal LM: any `transformers` model from a local folder (Qwen2.5-0.5B-Instruct in the
    paper), or a small random Qwen2 (the tiny preset)."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
    if path:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg)


def internvl_llm_config(folder) -> dict:
    """The language model's config inside an InternVL checkpoint folder (`config.json`'s `llm_config`,
    InternVL2.5-1B: a Qwen2 of 151,674 tokens), or {} when `folder` is not one."""
    path = Path(folder) / "config.json" if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return config.get("llm_config", {}) if isinstance(config, dict) else {}


def llm_from_internvl(folder) -> nn.Module:
    """The causal LM as the official CSIA builds it: InternVL's own language-model config (its
    vocabulary, with InternVL's added tokens), fresh weights that `--init` then loads."""
    from transformers import AutoConfig, AutoModelForCausalLM
    llm_config = dict(internvl_llm_config(folder))
    model_type = llm_config.pop("model_type", "qwen2")
    llm_config.pop("architectures", None)
    config = AutoConfig.for_model(model_type, **llm_config)
    return AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)


def llm_from_config(folder) -> nn.Module:
    """A causal LM of the shape a `config.json` in `folder` describes, with fresh weights (a
    continuing csia run, whose weights come from its checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True),
                                            torch_dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Detection fine-tuning with the ViT (Sec. 3.3)
# ---------------------------------------------------------------------------------------------

ADAPTER_GROUP_ENDS = (3, 9, 18, 24)  # last block (from 1) of each official ViT-Adapter interaction group of 24
#   (`interaction_indexes=[[0, 2], [3, 8], [9, 17], [18, 23]]`, BabelRS_20kstep.py)


def group_end_blocks(depth: int) -> tuple:
    """The blocks that end ViT-Adapter's four interaction groups, scaled to a ViT of `depth`
    blocks, ⌈depth·e/24⌉: (3, 9, 18, 24) for 24, (2, 5, 9, 12) for 12, (1, 2, 3, 4) for 4 (a ViT of
    fewer than 4 blocks reads some block twice)."""
    return tuple(math.ceil(depth * e / ADAPTER_GROUP_ENDS[-1]) for e in ADAPTER_GROUP_ENDS)


class ViTPyramid(nn.Module):
    """The ViT as a multi-scale backbone (Sec. 3.3): no CLS token; pyramid level l reads the output
    of block `taps[l]`, by default the blocks that end the official ViT-Adapter's interaction
    groups (3, 9, 18, 24 of 24, `group_end_blocks`), from the finest level to the coarsest. Each
    token map (stride `patch`) is brought to its level's stride by transposed convolutions (finer)
    or max-pooling (coarser), as ViTDet's simple feature pyramid; `taps=(depth,) * 4` is the plain
    "last block only" pyramid. Not the official pyramid (that is `ViTAdapter`): no spatial-prior
    CNN and no deformable interaction, and each level reads one group's output where the adapter
    mixes every group's output into every level (`--vit_pyramid simple`, the tiny preset so far).
    Returns the list of maps and has `out_channels` and `strides`, as the detection neck expects."""

    def __init__(self, vit: ViT, strides=(8, 16, 32, 64), taps: tuple = ()):
        super().__init__()
        if vit.num_prefix:
            raise ValueError("the detection ViT has no CLS token: build it with cls_token=False")
        self.vit = vit
        self.taps = tuple(taps) or group_end_blocks(vit.depth)[-len(strides):]
        if len(self.taps) != len(strides) or not all(1 <= t <= vit.depth for t in self.taps):
            raise ValueError(f"taps {self.taps}: one block in 1..{vit.depth} per stride {tuple(strides)}")
        self.scales = nn.ModuleList()
        for s in strides:
            f = vit.patch / s
            if f == 4:
                self.scales.append(nn.Sequential(nn.ConvTranspose2d(vit.dim, vit.dim, 2, 2), nn.GELU(),
                                                 nn.ConvTranspose2d(vit.dim, vit.dim, 2, 2)))
            elif f == 2:
                self.scales.append(nn.ConvTranspose2d(vit.dim, vit.dim, 2, 2))
            elif f == 1:
                self.scales.append(nn.Identity())
            elif f < 1 and (1 / f).is_integer() and math.log2(1 / f).is_integer():
                self.scales.append(nn.MaxPool2d(int(1 / f)))
            else:
                raise ValueError(f"patch {vit.patch} cannot make stride {s}")
        self.out_channels = [vit.dim] * len(strides)
        self.strides = list(strides)

    def forward(self, images: torch.Tensor) -> list:
        B, _, H, W = images.shape
        hidden = self.vit(images)  # depth + 1 tensors (B, h·w, C)
        grid = (H // self.vit.patch, W // self.vit.patch)
        return [scale(hidden[t].transpose(1, 2).reshape(B, -1, *grid))  # (B, C, h, w) -> (B, C, H/s, W/s)
                for t, scale in zip(self.taps, self.scales)]


# The official pyramid: ViT-Adapter (Chen et al., ICLR 2023) as SM3Det b271f31 builds it
# (`mmrotate/models/backbones/vit_adapter.py`, `adapter_modules.py`, mmcv's deformable attention).
# Parameter names are the official ones, so an adapter trained there loads here as it is.

class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of (B, C, H, W) maps, in float32 (the adapter's `LayerNorm`, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):  # (B, C, H, W); normalised channels-last, where the C values of a pixel are contiguous
        x32 = F.layer_norm(x.float().permute(0, 2, 3, 1), (x.shape[1],), self.weight.float(), self.bias.float(), self.eps)
        return x32.permute(0, 3, 1, 2).to(x.dtype)


def _conv_norm_relu(c_in, c_out, stride):
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), ChannelLayerNorm(c_out), nn.ReLU(inplace=True)]


class SpatialPrior(nn.Module):
    """The spatial prior module: a small CNN giving maps at strides 4, 8, 16, 32 (`inplanes`, 2x, 4x,
    4x channels), each brought to the ViT width by a 1x1 conv (`fc1` only when stride 4 is an output)."""

    def __init__(self, inplanes: int, dim: int, with_stride4: bool):
        super().__init__()
        self.stem = nn.Sequential(*_conv_norm_relu(3, inplanes, 2), *_conv_norm_relu(inplanes, inplanes, 1),
                                  *_conv_norm_relu(inplanes, inplanes, 1), nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*_conv_norm_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_norm_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_norm_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, dim, 1) if with_stride4 else None
        self.fc2, self.fc3, self.fc4 = (nn.Conv2d(c, dim, 1) for c in (2 * inplanes, 4 * inplanes, 4 * inplanes))

    def forward(self, x):  # (B, 3, H, W) -> c1 (B, D, H/4, W/4) or None, c2, c3, c4 as (B, N_l, D) tokens
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        tokens = [fc(c).flatten(2).transpose(1, 2) for fc, c in ((self.fc2, c2), (self.fc3, c3), (self.fc4, c4))]
        return (self.fc1(c1) if self.fc1 is not None else None), *tokens


class DWConv(nn.Module):
    """3x3 depth-wise conv over the three pyramid levels of a token sequence (16 : 4 : 1 tokens)."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, H, W):  # x (B, 21·n, C), H x W the stride-16 grid
        B, _, C = x.shape
        sizes = [(2 * H, 2 * W), (H, W), (H // 2, W // 2)]
        parts = x.split([h * w for h, w in sizes], 1)
        return torch.cat([self.dwconv(p.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2)
                          for p, (h, w) in zip(parts, sizes)], 1)


class ConvFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.dwconv, self.act, self.fc2 = nn.Linear(dim, hidden), DWConv(hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x, H, W):
        return self.fc2(self.act(self.dwconv(self.fc1(x), H, W)))


class Injector(nn.Module):
    """Pyramid -> ViT tokens: x + γ · MSDeformAttn(LN(x), LN(c)), the tokens reading the 3 levels."""

    def __init__(self, dim, heads, points, init_values):
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = detection.MSDeformAttn(dim, heads, 3, points, dropout=0.1)  # mmcv's default dropout
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x, c, reference, shapes):
        zero = torch.zeros(c.shape[:2], dtype=torch.bool, device=c.device)
        return x + self.gamma * self.attn(self.query_norm(x), None, self.feat_norm(c), zero, reference, shapes,
                                          identity=0.0)


class Extractor(nn.Module):
    """ViT tokens -> pyramid: c' = LN(c) + MSDeformAttn(LN(c), LN(x)), then c' + ConvFFN(LN(c')). The
    residual adds the *normalised* query: mmcv's attention adds its `identity`, which defaults to the
    query it was given, here LN(c) (official `Extractor` with `mmcv_attn=True`)."""

    def __init__(self, dim, heads, points, cffn_ratio):
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = detection.MSDeformAttn(dim, heads, 1, points, dropout=0.1)
        self.ffn, self.ffn_norm = ConvFFN(dim, int(dim * cffn_ratio)), nn.LayerNorm(dim)

    def forward(self, c, x, reference, H, W):
        zero = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        c = self.attn(self.query_norm(c), None, self.feat_norm(x), zero, reference, [(H, W)])
        return c + self.ffn(self.ffn_norm(c), H, W)


class Interaction(nn.Module):
    """One interaction group: inject, run the group's ViT blocks, extract (twice more after the last group)."""

    def __init__(self, dim, heads, points, init_values, cffn_ratio, extra: bool):
        super().__init__()
        self.injector = Injector(dim, heads, points, init_values)
        self.extractor = Extractor(dim, heads, points, cffn_ratio)
        self.extra_extractors = nn.ModuleList(Extractor(dim, heads, points, cffn_ratio) for _ in range(2)) if extra else None


def _grid_centres(shapes, device):
    """Cell centres of each (h, w) grid, normalised, concatenated: (1, Σ h·w, 2) as (x, y)."""
    out = []
    for h, w in shapes:
        y, x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, device=device) / h,
                              torch.linspace(0.5, w - 0.5, w, device=device) / w, indexing="ij")
        out.append(torch.stack([x.reshape(-1), y.reshape(-1)], -1))
    return torch.cat(out)[None]


class ViTAdapter(nn.Module):
    """The BabelRS detector's backbone as the official code builds it (Sec. 3.3; SM3Det's
    `InternViTAdapter`): the ViT's blocks run in interaction groups (`interaction_indexes`, official
    [[0, 2], [3, 8], [9, 17], [18, 23]] of 24); around each group an injector lets the ViT tokens read
    the spatial prior's pyramid (strides 8, 16, 32) and an extractor writes the group's output back
    into it. At the end the *last* block's tokens, resized, are added to every level
    (`add_vit_feature`), stride 4 comes from a transposed conv of stride 8 plus the prior's, and each
    level gets its own channel LayerNorm. Returns the maps of `out_indices` (0: stride 4 ... 3: 32).
    Needs image sides divisible by 32 and a patch of 16 (the ViT grid is the stride-16 level)."""

    def __init__(self, vit: ViT, interaction_indexes=None, conv_inplane: int = 64, heads: int = 16, points: int = 4,
                 init_values: float = 0.1, cffn_ratio: float = 0.25, out_indices=(0, 1, 2, 3)):
        super().__init__()
        if vit.num_prefix:
            raise ValueError("the detection ViT has no CLS token: build it with cls_token=False")
        if vit.patch != 16:
            raise ValueError(f"ViT-Adapter reads the ViT grid as its stride-16 level: patch 16, not {vit.patch}")
        self.vit = vit
        self.interaction_indexes = [list(g) for g in (interaction_indexes or adapter_groups(vit.depth))]
        self.out_indices = tuple(out_indices)
        dim = vit.dim
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = SpatialPrior(conv_inplane, dim, 0 in self.out_indices)
        n = len(self.interaction_indexes)
        self.interactions = nn.ModuleList(Interaction(dim, heads, points, init_values, cffn_ratio, i == n - 1)
                                          for i in range(n))
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2) if 0 in self.out_indices else None
        self.norm1 = ChannelLayerNorm(dim) if 0 in self.out_indices else None
        self.norm2, self.norm3, self.norm4 = ChannelLayerNorm(dim), ChannelLayerNorm(dim), ChannelLayerNorm(dim)
        self.out_channels = [dim] * len(self.out_indices)
        self.strides = [4 * 2 ** i for i in self.out_indices]
        self._init_weights()

    def _init_weights(self):  # as the official: truncated normal for linears, He normal for convs, N(0, 1) levels
        for m in [*self.spm.modules(), *self.interactions.modules(), *([self.up] if self.up is not None else [])]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                                                              // m.groups)))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.interactions.modules():  # the deformable attentions keep their own init
            if isinstance(m, detection.MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, images: torch.Tensor) -> list:
        B, _, H_img, W_img = images.shape
        H, W = H_img // 16, W_img // 16
        c1, c2, c3, c4 = self.spm(images)
        c = torch.cat([c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]], 1)  # (B, 21·n, D)
        pyramid = [(2 * H, 2 * W), (H, W), (H // 2, W // 2)]
        ref_tokens = _grid_centres([(H, W)], images.device)[:, :, None].expand(B, -1, 3, -1)  # (B, N, 3, 2)
        ref_pyramid = _grid_centres(pyramid, images.device)[:, :, None].expand(B, -1, 1, -1)  # (B, 21·n, 1, 2)
        x = self.vit.embeddings(images)  # (B, H·W, D)
        blocks = self.vit.encoder.layers
        for (first, last), inter in zip(self.interaction_indexes, self.interactions):
            x = inter.injector(x, c, ref_tokens, pyramid)
            for block in blocks[first:last + 1]:
                if self.vit.grad_checkpoint and self.training:
                    x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
            c = inter.extractor(c, x, ref_pyramid, H, W)
            for extra in inter.extra_extractors or []:
                c = extra(c, x, ref_pyramid, H, W)
        tokens = c.split([h * w for h, w in pyramid], 1)
        c2, c3, c4 = (t.transpose(1, 2).reshape(B, -1, h, w) for t, (h, w) in zip(tokens, pyramid))  # (B, D, h_l, w_l)
        x3 = x.transpose(1, 2).reshape(B, -1, H, W)  # the last block, added to every level
        maps = [c2 + F.interpolate(x3, scale_factor=2, mode="bilinear", align_corners=False), c3 + x3,
                c4 + F.interpolate(x3, scale_factor=0.5, mode="bilinear", align_corners=False)]
        norms = [self.norm2, self.norm3, self.norm4]
        if self.up is not None:
            maps.insert(0, self.up(c2) + c1 + F.interpolate(x3, scale_factor=4, mode="bilinear", align_corners=False))
            norms.insert(0, self.norm1)
        out = [norm(m.float()) for norm, m in zip(norms, maps)]  # strides 4, 8, 16, 32 (4 only with index 0)
        return [out[i - (0 if self.up is not None else 1)] for i in self.out_indices]


def adapter_groups(depth: int) -> list:
    """The interaction groups [first, last] (0-based blocks) of a ViT of `depth` blocks: the official
    [[0, 2], [3, 8], [9, 17], [18, 23]] for 24, scaled for others (`group_end_blocks`)."""
    ends = group_end_blocks(depth)
    return [[0 if i == 0 else ends[i - 1], e - 1] for i, e in enumerate(ends)]


def layer_decay_groups(model: nn.Module, vit_prefix: str, depth: int, decay: float, weight_decay: float) -> list:
    """BabelRS's layer-wise learning-rate decay (InternViTAdapterLayerDecayOptimizerConstructor):
    layer_id 0 for the embeddings, i + 1 for block i, depth + 1 for everything else; lr scale
    decay^(depth + 1 - layer_id). 1-D parameters and biases get no weight decay."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(vit_prefix + "embeddings.") or name == "backbone.level_embed":
            layer = 0  # the adapter's level embeddings decay as the patch embedding (official get_num_layer_for_vit)
        elif name.startswith(vit_prefix + "encoder.layers."):
            layer = int(name[len(vit_prefix + "encoder.layers."):].split(".")[0]) + 1
        else:
            layer = depth + 1
        no_wd = p.ndim == 1 or name.endswith(".bias")
        key = (layer, no_wd)
        if key not in groups:
            groups[key] = dict(params=[], lr_mult=decay ** (depth + 1 - layer), weight_decay=0.0 if no_wd else weight_decay)
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_detector(vit_args: dict = None, vit_taps: list = (), vit_pyramid: str = "simple", **kwargs) -> detection.RotatedDETR:
    """The BabelRS detector (Sec. 3.3): the ViT (`vit_args`: dim, depth, heads, patch, image_size) as
    a pyramid under `detection.build_detector`'s neck and per-modality head sets; without `vit_args`
    the plain ResNet detector. `vit_pyramid`: "adapter", the official ViT-Adapter (`ViTAdapter`,
    strides 8, 16, 32 and the neck's extra 64; deformable heads as the ViT's, a spatial prior of 64
    channels at widths >= 512 and width / 4 below), or "simple", a ViTDet-style pyramid reading one
    block per level (`ViTPyramid`, `vit_taps`). Takes the arguments a run stores in model.json (runs
    from before the adapter have no `vit_pyramid`: simple)."""
    if not vit_args:
        return detection.build_detector(**kwargs)
    levels = kwargs.get("levels", 4)
    if vit_pyramid == "adapter":
        vit = ViT(**vit_args, cls_token=False)
        pyramid = ViTAdapter(vit, heads=vit_args.get("heads", 16), conv_inplane=64 if vit.dim >= 512 else max(8, vit.dim // 4),
                             out_indices=(1, 2, 3)[:levels])
    elif vit_pyramid == "simple":
        pyramid = ViTPyramid(ViT(**vit_args, cls_token=False), strides=tuple(8 * 2 ** l for l in range(levels)),
                             taps=tuple(vit_taps))
    else:
        raise ValueError(f"vit_pyramid must be adapter or simple, got {vit_pyramid!r}")
    return detection.build_detector(**kwargs, backbone_module=pyramid)
