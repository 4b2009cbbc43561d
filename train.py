"""The one entry point: `python train.py --stage finetune|csia|sam|mutdet [--preset tiny|paper] [--<field> value]`.

Every stage has one flat `@dataclass` config; `--preset tiny` (the default: CPU, SynthSOI, minutes)
and `--preset paper` (the papers' sizes and hyper-parameters) are two instances of it, and every
field is also a flag of the same name (`--max_steps` or `--max-steps`). The resolved config is
printed and stored in the run folder `runs/<stage>-<time>/` (or `--out DIR`) with:

    config.json     the resolved config          model.json   what eval.py needs to rebuild the model
    log.jsonl       one line per step: step, loss, every loss term, grad_norm, lr, samples_per_s
    model.safetensors, state.pt   weights; optimizer / scheduler / scaler / RNG / step (weights_only)

`--resume DIR` continues a run exactly where it stopped, in the same folder. Under
`torchrun --nproc_per_node N` the same command trains with DDP (gloo on CPU, nccl on GPU).
The runs behind the papers' tables (sweeps), their costs and the tables themselves are in tables.py.
Bad data stops with the data set's one-line message and exit status 2; a non-finite loss or
gradient norm is logged with its step and stops the run with exit status 3.

May import: babelrs, mutdet, eval, detection, datasets, rotated_ops; never tables.py (DESIGN.md).
"""
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

import babelrs
import datasets
import detection
import eval as evaluation
import mutdet

EXIT_BAD_DATA, EXIT_NONFINITE, EXIT_PREEMPTED = 2, 3, 4  # 4: stopped by SIGTERM / SIGUSR1 after a checkpoint
EXIT_WRITE_FAILED = 5  # a checkpoint could not be written (a full disk); the previous one stays
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")  # what cluster schedulers send before they kill a job, and Ctrl-C
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, as a shell reports SIGINT


# ---------------------------------------------------------------------------------------------
# Configs and presets (one dataclass per stage, in the order of the stages below)
# ---------------------------------------------------------------------------------------------

@dataclass
class CSIAConfig:
    """BabelRS CSIA pre-training with LVSA (Sec. 3.1-3.2): ViT + projector + causal LM on the
    instruction data of all modalities, cross-entropy on the answer tokens."""
    # data
    data: list[str] = field(default_factory=list)  # an instruction meta json (the official
    #   BabelRS_ft_data_instruct.json layout), or MODALITY:PATH detection sets (DOTA, DIOR-R, SARDet COCO,
    #   DroneVehicle) turned into App. D instructions (cached in the run folder); default SynthSOI's
    rate_rgb: float = 1.0  # sample rate (repeat_time) of a corpus built from detections, per modality
    rate_sar: float = 0.6  # Tab. 1: SARLang 0.6
    rate_ir: float = 1.0  # Tab. 1: MMRS-1M IR 1 (the public meta json repeats it x3)
    concept_map: str = ""  # json {class name: shared concept} on top of babelrs.CONCEPT_MAP
    synth_root: str = "data/synthsoi"  # where SynthSOI is written
    image_size: int = 128  # tile side; paper: 448 (force_image_size)
    max_tiles: int = 1  # dynamic tiles per image (+ a thumbnail when > 1); paper: 6 (max_dynamic_patch)
    max_length: int = 512  # tokens; paper: 3072
    batch_size: int = 8  # samples per process and micro-batch; paper: 4
    global_batch: int = 8  # samples per optimizer step over all processes (accumulation makes up the rest); paper:
    #   128 = 4 x 4 accumulation x 8 GPUs (Sec. 4.3)
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # opt in: scale lr by global_batch / the preset's
    workers: int = 0  # data loading processes
    seed: int = 0  # data order and initialisation
    # ViT (InternViT-300M in the paper)
    vit: str = ""  # local InternViT weights (.safetensors or folder); "fractal": the stand-in (tiny); empty = random
    vit_dim: int = 64  # paper: 1024
    vit_depth: int = 4  # paper: 24
    vit_heads: int = 4  # paper: 16
    patch: int = 8  # paper: 14
    drop_path: float = 0.0  # paper: 0.1 (--drop_path_rate)
    grad_checkpoint: bool = False  # paper: True
    # LLM (InternVL2.5-1B's Qwen2.5-0.5B in the paper: built from an InternVL --init's own llm_config)
    llm: str = ""  # another local transformers causal-LM folder (with its tokenizer); empty = the InternVL
    #   --init's LM, else a small random Qwen2
    llm_dim: int = 128  # width of the random Qwen2 (without --llm); Qwen2.5-0.5B: 896
    llm_layers: int = 2  # its layers; Qwen2.5-0.5B: 24
    llm_heads: int = 4  # its attention heads; Qwen2.5-0.5B: 14
    llm_kv_heads: int = 2  # its key/value heads; Qwen2.5-0.5B: 2
    llm_ffn: int = 256  # its MLP width; Qwen2.5-0.5B: 4864
    vocab_size: int = 1024  # of the tokenizer trained on the instruction corpus
    init: str = ""  # a csia run or an InternVL2.5-1B folder (vision_model, mlp1, language_model, tokenizer)
    init_strict: bool = False  # --init must match every tensor (else a one-line error); default: skip and list
    # LVSA (Sec. 3.2)
    merge: Literal["lvsa", "last", "concat", "sum", "per-layer"] = "lvsa"  # Tab. 5 rows
    shuffle_answers: bool = False  # control, not in the paper: answers permuted across samples (babelrs.shuffle_answers)
    layers: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # hidden-state indices; paper: [2, 8, 17, 23]
    #   tiny: every block of the 4, so CSIA aligns each block the tiny detector's pyramid reads
    tau: float = 120.0  # annealing steps of α(t); paper: 6000 of 20000 (Sec. 4.9)
    # optimisation (BabelRS_internvl_1b_20ksteps.sh)
    lr: float = 1e-3  # paper: 2e-5
    weight_decay: float = 0.01  # AdamW (BabelRS_internvl_1b_20ksteps.sh: 0.01)
    warmup_ratio: float = 0.1  # linear warm-up, then cosine to 0
    clip: float = 1.0  # HF Trainer's max_grad_norm
    steps: int = 400  # length of the schedule; paper: 20000
    amp: Literal["off", "bf16", "fp16"] = "off"  # paper: bf16
    compile: bool = False  # torch.compile (inductor) the transformer layers, in place (compile_layers); opt-in
    max_steps: int = 0  # stop after this many steps (0 = the whole schedule)
    # run
    out: str = ""  # run folder; default runs/csia-<time>
    resume: str = ""  # run folder to continue
    ckpt_every: int = 1000  # steps between checkpoints (and one at the end)


CSIA_PRESETS = {
    "tiny": CSIAConfig(vit="fractal"),
    "paper": CSIAConfig(image_size=448, max_tiles=6, max_length=3072, batch_size=4, global_batch=128, workers=4,
                        vit_dim=1024, vit_depth=24, vit_heads=16, patch=14, drop_path=0.1, grad_checkpoint=True,
                        layers=list(babelrs.OFFICIAL_LAYERS), tau=6000.0, lr=2e-5, steps=20000, amp="bf16"),
}


@dataclass
class FinetuneConfig:
    """Rotated-DETR (ARS-DETR) detection training on one or more sources, one head set per modality."""
    # data
    data: list[str] = field(default_factory=list)  # MODALITY:PATH ...; none = SynthSOI-RGB, generated on first use
    synth_root: str = "data/synthsoi"  # where SynthSOI is written
    image_size: int = 256  # longer side after resizing; paper: RResize(800, 800) (MutDet base_settings_DIOR.py)
    data_fraction: float = 1.0  # fraction of each training split, drawn with --seed (MutDet's 10% DIOR-R)
    filter_empty: bool = True  # leave training images without objects out (mmdet's filter_empty_gt=True, which
    #   ARS-DETR's dn_arw config chain keeps, 0d96c5e); --no-filter-empty trains on them too
    seed: int = 0  # data order, augmentation, initialisation and the --data_fraction draw
    batch_size: int = 4  # images per process and micro-batch with one source (several: source_ratio); paper: 2
    global_batch: int = 4  # images per optimizer step over all processes; gradient accumulation makes up the
    #   rest, so 1 or 8 GPUs train alike. ARS-DETR on DOTA: 2 (its README's "Batch Size 2", mmrotate's
    #   column of the images of one iteration over all GPUs: 1 x 2); MutDet 16 = 8 x 2 and BabelRS 32 =
    #   8 x (2 + 1 + 1) (8 GPUs: our assumption, neither repository nor paper gives a count)
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # opt in: scale lr by global_batch / the preset's
    source_ratio: list[int] = field(default_factory=list)  # images of each source per batch (BabelRS: 2 SAR : 1 RGB : 1 IR)
    loss_weights: list[float] = field(default_factory=list)  # per source (BabelRS: RGB 1.5); default 1 each
    augment: bool = True  # per source as SOI-Det (datasets.detection_transform): SAR h-flip 0.5; RGB/IR h/v/diagonal
    #                       flips 0.25 each (ARS-DETR, MutDet) and rotation with --rotate_p
    rotate_p: float = 0.0  # PolyRandomRotate probability (BabelRS: 0.5; MutDet: none)
    workers: int = 0  # data loading processes
    # model (detection.build_detector)
    synth_modalities: list[str] = field(default_factory=lambda: ["rgb"])  # SynthSOI parts used without --data
    backbone: Literal["resnet50", "resnet18", "vit"] = "resnet18"  # MutDet: ResNet-50; BabelRS: the ViT
    resnet: str = ""  # local torchvision ResNet weights (ImageNet); "fractal": the formula-driven stand-in
    #   (tiny presets; built on first use, STANDINS); empty = random init
    vit_dim: int = 64  # the ViT backbone (BabelRS: InternViT-300M, 1024 / 24 / 16, patch 16 at 800 px)
    vit_depth: int = 4  # paper: 24
    vit_heads: int = 4  # paper: 16
    vit_patch: int = 8  # paper: 16 (InternViT's 14-px kernel resized)
    vit_family: Literal["internvit", "clip", "dinov2"] = "internvit"  # weights of --init (Tab. 3 baselines)
    grad_checkpoint: bool = False  # recompute each ViT block in the backward pass instead of storing its
    #   activations (ViT-Adapter's with_cp=True in BabelRS_20kstep.py): far less memory, about a third more time
    vit_pyramid: Literal["adapter", "simple"] = "simple"  # paper: adapter, the official ViT-Adapter (patch 16);
    #   simple: a ViTDet-style pyramid reading one block per level (the tiny tables so far; babelrs.py)
    vit_taps: list[int] = field(default_factory=list)  # simple: the block each level reads; none = the
    #   adapter's interaction-group ends, scaled to vit_depth (3 9 18 24 of 24; 1 2 3 4 of the tiny 4)
    layer_decay: float = 1.0  # layer-wise lr decay of the ViT; BabelRS: 0.95
    frozen_bn: bool = False  # paper: True (norm_eval, requires_grad=False)
    dim: int = 128  # paper: 256
    heads: int = 4  # paper: 8
    levels: int = 4  # feature levels of the deformable attention (ARS-DETR: 4, strides 8-64)
    points: int = 4  # sampling points per head and level (ARS-DETR: 4)
    enc_layers: int = 2  # paper: 6 (ars_detr_DIOR_MutDet.py)
    dec_layers: int = 3  # paper: 6
    ffn: int = 256  # paper: 1024
    dropout: float = 0.0  # paper: 0.1
    num_queries: int = 100  # paper: 300
    num_dn_queries: int = 30  # paper: 100
    gn_groups: int = 32  # GroupNorm groups of the neck (mmdet ChannelMapper: 32)
    match_costs: list[float] = field(default_factory=lambda: [2.0, 2.0, 5.0, 2.0])  # matcher (class, L1, GIoU, angle)
    match_l1: Literal["cxcywh", "official"] = "cxcywh"  # official: ARS-DETR's predicted-xyxy vs gt-cxcywh L1 cost
    init: str = ""  # a run of this project or .safetensors file: a detector (non-strict), or with the ViT
    #                 backbone a csia run, the released BabelRS ViT or an InternVL folder (the ViT part);
    #                 "fractal": the ViT's formula-driven stand-in (babelrs-tiny); empty = random init
    init_strict: bool = False  # a detector --init must match every tensor (after the documented drops)
    # optimisation (MutDet base_settings_DIOR.py)
    lr: float = 2e-4  # paper: 1e-4
    weight_decay: float = 1e-5  # AdamW; paper: 1e-5 (ARS-DETR, MutDet), 0.05 (BabelRS)
    lr_mult: float = 1.0  # paper: 0.1 for the parameters named in lr_mult_keys
    lr_mult_keys: list[str] = field(default_factory=lambda: ["backbone", "sampling_offsets", "reference_points"])  # parameters (by name) trained at lr x lr_mult (ARS-DETR)
    clip: float = 35.0  # max L2 norm of all gradients
    warmup: int = 100  # iterations of linear warm-up from warmup_ratio·lr; paper: 500
    warmup_ratio: float = 1 / 3  # warm-up starts at warmup_ratio x lr (mmcv)
    epochs: int = 40  # paper: 36
    lr_steps: list[float] = field(default_factory=lambda: [36])  # epochs where lr *= 0.1; paper: [32]
    amp: Literal["off", "bf16", "fp16"] = "off"  # fp16 uses dynamic loss scaling
    compile: bool = False  # torch.compile (inductor) the transformer layers, in place (compile_layers); opt-in
    max_steps: int = 0  # stop after this many steps (0 = the whole schedule); the schedule is unchanged
    # run
    out: str = ""  # run folder; default runs/finetune-<time>
    resume: str = ""  # run folder to continue
    ckpt_every: int = 500  # steps between checkpoints (and one at the end)
    eval_every: int = 0  # steps between scorings of the test splits during training (logged as eval_*)
    eval: bool = True  # score the test splits at the end (eval.py --run)


FINETUNE_PRESETS = {
    "tiny": FinetuneConfig(resnet="fractal", frozen_bn=True),  # a pretrained backbone keeps its statistics (paper: True)
    # BabelRS joint fine-tuning on SynthSOI's three modalities, the ViT of a tiny csia run, on the official
    # pyramid (ViT-Adapter) at the ViT stand-in's grid: 192 px, patch 16 (tiny protocol v3)
    "babelrs-tiny": FinetuneConfig(synth_modalities=["sar", "rgb", "ir"], source_ratio=[2, 1, 1], image_size=192,
                                   vit_patch=16, vit_pyramid="adapter",
                                   loss_weights=[1.0, 1.5, 1.0], backbone="vit", init="fractal", batch_size=4,
                                   global_batch=4, epochs=12,
                                   lr_steps=[8, 11], warmup=50, weight_decay=0.05),
    # BabelRS Sec. 4.3 / BabelRS_20kstep.py, with the DETR head sets of the detection module
    "babelrs": FinetuneConfig(source_ratio=[2, 1, 1], loss_weights=[1.0, 1.5, 1.0], image_size=800, backbone="vit",
                              global_batch=32, grad_checkpoint=True,
                              vit_dim=1024, vit_depth=24, vit_heads=16, vit_patch=16, vit_pyramid="adapter", layer_decay=0.95,
                              dim=256, heads=8, enc_layers=6, dec_layers=6, ffn=1024, dropout=0.1, num_queries=300,
                              num_dn_queries=100, lr=5e-5, weight_decay=0.05, warmup=500, epochs=12,
                              lr_steps=[8, 11], rotate_p=0.5, workers=4, ckpt_every=2000),
    # MutDet's fine-tuning on DIOR-R (Tab. 2): ARS-DETR R-50 at RResize(800, 800)
    # (MutDet `base_settings_DIOR.py`, `ars_detr_DIOR_MutDet.py`); the preset of the MutDet sweeps
    "paper": FinetuneConfig(image_size=800, batch_size=2, global_batch=16, backbone="resnet50", frozen_bn=True,
                            match_l1="official", dim=256, heads=8,
                            enc_layers=6, dec_layers=6, ffn=1024, dropout=0.1, num_queries=300, num_dn_queries=100,
                            lr=1e-4, lr_mult=0.1, warmup=500, epochs=36, lr_steps=[32], workers=4,
                            ckpt_every=2000),
}
# ARS-DETR on DOTA-v1.0 (MutDet Tab. 3): the same detector on 1024-px trainval patches (gap 200),
# RResize(1024, 1024) (ARS-DETR `dn_arw_arm_arcsl_rdetr_r50_dota.py` and its bases), at the global batch of
# its released 73.42 AP50: samples_per_gpu=2 in the config and "Batch Size 2" in the README's table (0d96c5e),
# so one process of 2 images (lr 1e-4 unscaled, as the config); else as "paper"
FINETUNE_PRESETS["ars-detr-dota"] = dataclasses.replace(FINETUNE_PRESETS["paper"], image_size=1024, global_batch=2)


@dataclass
class SAMConfig:
    """MutDet's pseudo-labels: SAM masks -> le90 boxes -> object embeddings -> PCA -> k-means classes."""
    data: list[str] = field(default_factory=list)  # MODALITY:PATH of images; none = SynthSOI-RGB train
    synth_root: str = "data/synthsoi"  # where SynthSOI is written
    proposals: Literal["sam", "random", "selective"] = "sam"  # where the boxes come from (MutDet issue 3):
    #   SAM's masks; random boxes like those of the sam run --proposals_like; selective search (mutdet.py)
    proposals_like: str = ""  # a finished sam run whose box counts and sizes --proposals random draws from
    ss_k: float = 100.0  # selective search: Felzenszwalb's k (Uijlings et al.: 50-300); σ 0.8, regions >= 50 px
    masks: Literal["sam", "components"] = "sam"  # components: mutdet.colour_components, a SAM stand-in
    #   that finds SynthSOI's objects without trained weights (a random SAM's masks are noise)
    sam: str = ""  # local transformers SAM folder (SAM ViT-H in the paper); empty = a tiny random SAM
    sam_image_size: int = 256  # input side of the tiny random SAM (a loaded SAM has its own)
    points_per_side: int = 8  # paper: 32 (generator default)
    points_per_batch: int = 64  # point prompts per SAM forward (segment-anything: 64)
    pred_iou_thresh: float = -1.0  # paper: 0.88; the tiny random SAM keeps every mask
    stability_score_thresh: float = 0.0  # paper: 0.95
    stability_score_offset: float = 1.0  # threshold offset of the stability score (segment-anything: 1.0)
    box_nms_thresh: float = 1.0  # paper: 0.7; a random SAM's masks all overlap, so the tiny preset keeps them all
    max_boxes: int = 1000  # max_gt_num of the pre-training detector
    image_size: int = 256  # the image is resized to this longer side for the crops; paper: 1024
    embed_backbone: Literal["resnet50", "resnet18"] = "resnet18"  # paper: ResNet-50 (ImageNet, frozen)
    resnet: str = ""  # its local weights; "fractal": the formula-driven stand-in (tiny)
    crop: int = 64  # RoIAlign output side; paper: 224
    context: float = 1.5  # box enlargement for the crop
    pca_dim: int = 128  # paper: 256 (= the detector width, the embeddings enter it raw)
    clusters: int = 16  # pseudo-classes; paper: 256
    fit_samples: int = 100000  # features used to fit PCA and k-means
    seed: int = 0  # PCA / k-means initialisation
    max_steps: int = 0  # stop after this many images (0 = all)
    out: str = ""  # run folder holding the cache
    resume: str = ""  # same as --out: a rerun skips the images already done
    workers: int = 0  # data loading processes


SAM_PRESETS = {
    "tiny": SAMConfig(resnet="fractal"),
    "paper": SAMConfig(points_per_side=32, pred_iou_thresh=0.88, stability_score_thresh=0.95, box_nms_thresh=0.7,
                       image_size=1024,
                       embed_backbone="resnet50", crop=224, pca_dim=256, clusters=256),
}


@dataclass
class MutDetConfig:
    """MutDet detection pre-training (MutDet_DOTA_Pretrain.py): ARS-DETR on the SAM boxes and
    k-means pseudo-classes of a sam cache, with mutual enhancement, contrastive alignment and the
    auxiliary siamese head. Each ablation row is a run: --no-enhance, --no-siamese, --embed-loss l1,
    --pseudo-classes 1, --no-dn-align; DETReg is `--no-enhance --embed-loss l1 --pseudo-classes 1
    --no-dn-align`. The DETReg row's targets are this project's (ImageNet layer4 + PCA-256 + L2 of up
    to 1000 SAM boxes), not DETReg's own (SwAV features of the top-30 selective-search boxes)."""
    # data
    data: str = ""  # a sam run folder; none = SynthSOI-RGB train, cached first by the sam stage (tiny preset)
    synth_root: str = "data/synthsoi"  # SynthSOI, and its sam cache at <synth_root>-sam-<dim>d
    image_size: int = 256  # paper: 1024 (DOTA 800-px crops with gap 200, RResize to 1024)
    pseudo_classes: int = 0  # 0 = the cache's k-means clusters (paper: 256); 1 = class-agnostic (DETReg)
    seed: int = 0  # data order, augmentation and initialisation
    batch_size: int = 4  # images per process and micro-batch; paper: samples_per_gpu=2
    global_batch: int = 4  # images per optimizer step over all processes; paper: 16 = 8 x 2 (8 GPUs: our assumption)
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # opt in: scale lr by global_batch / the preset's
    augment: bool = True  # RRandomFlip h/v/diagonal p=0.25 each; no colour augmentation
    rotate_p: float = 0.0  # MutDet: none
    workers: int = 0  # data loading processes
    # detector (detection.build_detector)
    backbone: Literal["resnet50", "resnet18"] = "resnet18"  # paper: ResNet-50, ImageNet weights
    resnet: str = ""  # local torchvision ResNet weights; "fractal": the formula-driven stand-in (tiny); empty = random
    freeze_backbone: bool = True  # frozen_stages=4 + frozen_parameters=['backbone']; the neck trains
    frozen_bn: bool = False  # paper: True
    dim: int = 128  # paper: 256 (= the embedding width: the embeddings enter the enhancement raw)
    heads: int = 4  # paper: 8
    levels: int = 4  # feature levels of the deformable attention (ARS-DETR: 4)
    points: int = 4  # sampling points per head and level (ARS-DETR: 4)
    enc_layers: int = 2  # the released R-50 config: 2 (base_ars_detr_E2D2.py); fine-tuning has 6
    dec_layers: int = 2  # 2, as enc_layers
    ffn: int = 256  # paper: 1024
    dropout: float = 0.0  # paper: 0.1
    num_queries: int = 100  # paper: 300
    num_dn_queries: int = 30  # paper: 100
    gn_groups: int = 32  # GroupNorm groups of the neck (mmdet ChannelMapper: 32)
    match_costs: list[float] = field(default_factory=lambda: [2.0, 2.0, 5.0, 2.0])  # matcher (class, L1, GIoU, angle)
    match_l1: Literal["cxcywh", "official"] = "cxcywh"  # official: ARS-DETR's predicted-xyxy vs gt-cxcywh L1 cost
    # MutDet's parts (mutdet.MutDetPretrainer)
    enhance: bool = True  # mutual enhancement + the enhanced decoding branch
    siamese: bool = True  # the auxiliary siamese head (the plain branch)
    align: bool = True  # the embedding (alignment) losses
    embed_loss: Literal["infonce", "l1"] = "infonce"  # L_ca, or DETReg's L1
    dn_align: bool = True  # the alignment term on the DN queries (MutDet's addition; off in the DETReg row)
    enhance_depth: int = 3  # enhancement layers (two-way blocks); paper: 3
    enhance_heads: int = 4  # paper: 8
    enhance_mlp: int = 512  # paper: 2048
    init: str = ""  # weights to start from (a run of this project or .safetensors file)
    init_strict: bool = False  # --init must match every tensor (else a one-line error); default: skip and list
    # optimisation (base_settings.py)
    lr: float = 2e-4  # paper: 1e-4
    weight_decay: float = 1e-5  # AdamW; paper: 1e-5
    lr_mult: float = 1.0  # paper: 0.1 for the parameters named in lr_mult_keys
    lr_mult_keys: list[str] = field(default_factory=lambda: ["backbone", "sampling_offsets", "reference_points"])  # parameters (by name) trained at lr x lr_mult (ARS-DETR)
    clip: float = 35.0  # max L2 norm of all gradients; paper: 35
    warmup: int = 50  # paper: 500
    warmup_ratio: float = 1 / 3  # warm-up starts at warmup_ratio x lr (mmcv)
    epochs: int = 20  # paper: 36
    lr_steps: list[float] = field(default_factory=lambda: [18])  # epochs where lr *= 0.1; paper: [32]
    amp: Literal["off", "bf16", "fp16"] = "off"  # fp16 uses dynamic loss scaling
    compile: bool = False  # torch.compile (inductor) the transformer layers, in place (compile_layers); opt-in
    max_steps: int = 0  # stop after this many steps (0 = the whole schedule); the schedule is unchanged
    # run
    out: str = ""  # run folder; default runs/mutdet-<time>
    resume: str = ""  # run folder to continue
    ckpt_every: int = 500  # steps between checkpoints (and one at the end)


MUTDET_PRESETS = {
    "tiny": MutDetConfig(resnet="fractal", frozen_bn=True),  # a pretrained frozen backbone keeps its statistics
    "paper": MutDetConfig(image_size=1024, batch_size=2, global_batch=16, backbone="resnet50", frozen_bn=True,
                          match_l1="official", dim=256, heads=8,
                          ffn=1024, dropout=0.1, num_queries=300, num_dn_queries=100, enhance_heads=8,
                          enhance_mlp=2048, lr=1e-4, lr_mult=0.1, warmup=500, epochs=36, lr_steps=[32], workers=4,
                          ckpt_every=2000),
}


# ---------------------------------------------------------------------------------------------
# Distributed helpers (do nothing when WORLD_SIZE is unset)
# ---------------------------------------------------------------------------------------------

def setup_distributed():
    """(rank, world_size, device); initialises the process group under torchrun. Float32 matrix
    products stay in full float32 on a GPU, PyTorch's default and so the official runs' (convolutions
    use TF32 by default); TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 trades that for TF32's speed. cuDNN picks
    its fastest convolutions per input shape (`cudnn.benchmark`): the presets resize every image to
    one size, so the shapes repeat."""
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank = dist.get_rank()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return rank, world, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not torch.cuda.is_available():  # CPU runs repeat bit for bit at a fixed thread count (tested)
        torch.use_deterministic_algorithms(True, warn_only=True)
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors weights + a weights_only torch state, both written atomically
# ---------------------------------------------------------------------------------------------

def unwrap(model):
    return model.module if hasattr(model, "module") else model


def save_checkpoint(run: Path, model, state: dict) -> None:
    """Weights (`model.safetensors`, the step in its metadata) and `state.pt`, written so that a kill
    at any moment leaves one consistent pair: both new files are written in full first; the old pair
    is renamed to `*.prev` before the new one takes its place and is deleted only after. `resume`
    takes the newest pair whose two files agree on the step."""
    from safetensors.torch import save_file
    # clone: tied tensors (an LM's input and output embeddings) must not share storage in safetensors
    weights = {k: v.detach().cpu().clone().contiguous() for k, v in unwrap(model).state_dict().items()}
    try:
        save_file(weights, str(run / "model.safetensors.tmp"), metadata=dict(step=str(state["step"])))
        torch.save(state, run / "state.pt.tmp")
    except OSError:  # nothing of the new pair is left half-written; the current pair is untouched
        for name in CHECKPOINT_FILES:
            (run / (name + ".tmp")).unlink(missing_ok=True)
        raise
    for name in CHECKPOINT_FILES:  # the current pair becomes the fallback
        if (run / name).exists():
            os.replace(run / name, run / (name + ".prev"))
    for name in CHECKPOINT_FILES:
        os.replace(run / (name + ".tmp"), run / name)
    for name in CHECKPOINT_FILES:
        (run / (name + ".prev")).unlink(missing_ok=True)


CHECKPOINT_FILES = ("model.safetensors", "state.pt")


def checkpoint_pair(run: Path):
    """(weights file, state file, step) of the newest consistent checkpoint of a run, or None.
    Weights written before the step was stored in them pair with `state.pt`."""
    from safetensors import safe_open
    states, pairs = {}, []
    for name in ("state.pt", "state.pt.prev"):
        try:
            states[name] = int(torch.load(run / name, map_location="cpu", weights_only=True)["step"])
        except Exception:  # missing, or cut short by a kill
            continue
    for name in ("model.safetensors", "model.safetensors.prev"):
        try:
            with safe_open(str(run / name), "pt") as f:
                step = (f.metadata() or {}).get("step")
        except Exception:
            continue
        step = int(step) if step is not None else states.get("state.pt")
        pairs += [(run / name, run / state, step) for state, s in states.items() if s == step]
    return max(pairs, key=lambda p: p[2]) if pairs else None


def rng_state() -> dict:
    """The generators a step draws from: torch (denoising noise, dropout) and Python's `random`.
    (Augmentation has its own per-step generator, see datasets.StepBatches.)"""
    state = dict(torch=torch.get_rng_state(), python=random.getstate())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# ---------------------------------------------------------------------------------------------
# The training loop every stage shares
# ---------------------------------------------------------------------------------------------

def resume(run: Path, model, optimizer, scaler, rank: int) -> int:
    """Reload weights, optimizer, scaler and this rank's RNG from the newest consistent checkpoint of
    a run folder; the step to go on from. A folder without one (killed before its first checkpoint)
    starts over, with a fresh log.jsonl, and says so."""
    pair = checkpoint_pair(run)
    if pair is None:
        if rank == 0:
            print(f"{run}: no checkpoint yet (stopped before its first one); starting over with a fresh log.jsonl")
            (run / "log.jsonl").unlink(missing_ok=True)
        barrier()
        return 0
    from safetensors.torch import load_file
    weights, state_file, step = pair
    model.load_state_dict(load_file(str(weights)))
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    if rank == 0:
        _truncate_log(run / "log.jsonl", step)
    print(f"resumed {run} at step {step}")
    return step


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (steps after the last checkpoint are trained again)."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
    datasets.atomic_write_text(path, "".join(l + "\n" for l in keep))


class Preemption:
    """SIGTERM / SIGUSR1 / Ctrl-C set a flag instead of killing the process: the training loop
    finishes its step, writes a checkpoint and stops with EXIT_PREEMPTED; `--resume` goes on exactly.
    A second Ctrl-C stops at once (KeyboardInterrupt, one line from `main`)."""

    def __init__(self):
        import signal
        self.signal = None
        self.previous = {}
        for name in PREEMPT_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        import signal
        name = signal.Signals(signum).name
        if name == "SIGINT":
            if self.signal is not None:
                raise KeyboardInterrupt
            print("\nCtrl-C: finishing this step, then a checkpoint (Ctrl-C again stops at once)", file=sys.stderr)
        self.signal = name

    def requested(self, world: int, device) -> bool:
        """Whether any process got a signal (every process must stop at the same step)."""
        if world == 1:
            return self.signal is not None
        flag = torch.tensor([self.signal is not None], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self):
        import signal
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def compile_layers(model: torch.nn.Module) -> int:
    """`--compile`: torch.compile (inductor) each layer whose shapes are fixed by the image size, in
    place: the DETR's encoder layers (multi-scale deformable attention over every token: where fused
    sampling comes from on a GPU) and the ViT's blocks. In place (`nn.Module.compile`), so weight
    names and checkpoints are unchanged. The decoder and MutDet's enhancement see a query count that
    changes with the objects of each batch (denoising groups, SAM boxes) and would recompile, so they
    stay eager, with the matcher and the losses. Returns the number of layers compiled."""
    kinds = (detection.EncoderLayer, babelrs.Block)
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    for m in layers:
        m.compile()
    return len(layers)


def train_steps(cfg, run: Path, model, optimizer, scaler, batches, start: int, end: int, lr_fn, forward,
                per_step: int, desc: str, after_step=None, find_unused: bool = False, next_hint: str = "") -> int:
    """Steps start..end-1: set the lr, run `forward(net, micro_batch, step) -> (losses, extras)` on
    each micro-batch of `batches[step]` (a batch or a list of micro-batches for gradient
    accumulation) under autocast, clip, step, log one line, checkpoint every `cfg.ckpt_every` steps
    and at the end. Returns 0, or EXIT_NONFINITE after logging a non-finite loss or gradient norm."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    device = next(model.parameters()).device
    if getattr(cfg, "compile", False):
        compiled = compile_layers(model)
        if rank == 0:
            print(f"{desc}: --compile: {compiled} layers compiled (the first steps include compilation)")
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                        find_unused_parameters=find_unused)
    model.train()
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, end), num_workers=cfg.workers,
                                         persistent_workers=cfg.workers > 0, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(cfg.seed))  # not the global RNG
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    log = open(run / "log.jsonl", "a") if rank == 0 else None
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=end, initial=start, desc=desc, dynamic_ncols=True)
    status, t_last, t_start, totals = 0, time.time(), time.time(), []
    preempt = Preemption()
    try:  # a second Ctrl-C raises out of the loop: the signal handlers are restored all the same
        for step, batch in zip(range(start, end), loader):
            lr = lr_fn(step)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_mult", 1.0)
            micro = batch if isinstance(batch, list) else [batch]
            optimizer.zero_grad(set_to_none=True)
            sums, extras = {}, {}
            for i, mb in enumerate(micro):
                # DDP all-reduces the gradients once a step: after the last micro-batch
                sync = contextlib.nullcontext() if world == 1 or i == len(micro) - 1 else net.no_sync()
                with sync, torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    losses, extras = forward(net, mb, step)
                    loss = sum(losses.values()) / len(micro)
                    scaler.scale(loss).backward()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / len(micro)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            # every loss term of the step and the gradient norm in one tensor, averaged over processes (the
            # norm is the same on each), then one transfer to the host: the step's only sync on a GPU
            values = torch.stack([*sums.values(), grad_norm.detach().float()])
            if world > 1:
                dist.all_reduce(values)
                values /= world
            *term_values, grad_norm = values.tolist()
            terms = dict(zip(sums, term_values))
            total = sum(terms.values())
            finite = math.isfinite(total) and math.isfinite(grad_norm)
            if cfg.amp == "fp16":
                scaler.step(optimizer)  # skips the update on an overflow; the scaler lowers its scale
                finite = math.isfinite(total)
            elif finite:
                optimizer.step()
            scaler.update()
            now = time.time()
            record = dict(step=step + 1, loss=total, **terms, **extras, grad_norm=grad_norm, lr=lr,
                          samples_per_s=per_step / max(now - t_last, 1e-9),
                          eta_s=round((now - t_start) / (step + 1 - start) * (end - step - 1)))
            t_last = now
            totals.append(total)
            if rank == 0:
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}")
            if not finite:  # the update was skipped: the weights are still those of the last finite step
                bad = [k for k, v in [*terms.items(), ("grad_norm", grad_norm)] if not math.isfinite(v)]
                written = write_checkpoint(run, model, optimizer, scaler, cfg, step, rank, world)
                if rank == 0:
                    print(f"\nstep {step + 1}: non-finite {', '.join(bad)}; stopped. "
                          + (f"The last finite state (step {step}) is checkpointed: python train.py --resume {run} goes "
                             "on from it (a lower --lr, or --amp bf16 / off, may get past it)" if written else
                             "Its checkpoint could not be written; the run folder keeps the previous one"),
                          file=sys.stderr)
                status = EXIT_NONFINITE
                break
            done = step + 1
            if after_step is not None:
                after_step(done, log, bar)
            stop = preempt.requested(world, device)
            if (done % cfg.ckpt_every == 0 or done == end or stop) and not write_checkpoint(
                    run, model, optimizer, scaler, cfg, done, rank, world):
                if rank == 0:
                    pair = checkpoint_pair(run)
                    print(f"\n{desc}: the checkpoint of step {done} could not be written (a full disk?); "
                          + (f"the one of step {pair[2]} stays loadable: free space, then python train.py --resume {run}"
                             if pair else "no earlier checkpoint: free space and start again"), file=sys.stderr)
                status = EXIT_WRITE_FAILED
                break
            if stop and done < end:
                if rank == 0:
                    log.write(json.dumps(dict(step=done, preempted=preempt.signal or "another process")) + "\n")
                    log.flush()
                    print(f"\n{desc}: {preempt.signal or 'a signal'} at step {done}: checkpoint written; continue with "
                          f"python train.py --resume {run}", file=sys.stderr)
                status = EXIT_PREEMPTED
                break
    finally:
        preempt.close()
    if rank == 0:
        bar.close()
        log.close()
        last = totals[-10:]
        print(f"{desc}: {end if status == 0 else start + len(totals)} of {end} steps; final loss {last[-1]:.4g} (mean of "
              f"the last {len(last)}: {sum(last) / len(last):.4g}); run folder {run}" if totals else
              f"{desc}: nothing to do (step {start} of {end}); run folder {run}")
        if status == 0 and desc in NEXT_COMMAND:
            print("next: " + NEXT_COMMAND[desc].format(run=run, hint=next_hint))
    return status


def write_checkpoint(run: Path, model, optimizer, scaler, cfg, step: int, rank: int, world: int) -> bool:
    """`save_checkpoint` of the state after `step` steps, by rank 0, with every rank's RNG; False on
    every rank when the write failed (a full disk, a lost mount): the previous pair is untouched."""
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    ok = True
    if rank == 0:
        try:
            save_checkpoint(run, model, dict(step=step, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                                             rng=rngs, config=dataclasses.asdict(cfg)))
        except OSError:
            ok = False
    if world > 1:  # every process learns whether the write failed, so all stop at the same step
        flag = torch.tensor([int(ok)], device=next(model.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok


# what a finished run of each stage feeds (printed at its end)
NEXT_COMMAND = {
    "csia": "python train.py --stage finetune --preset babelrs-tiny --init {run}   (paper: --preset babelrs)",
    "finetune": "python eval.py --run {run} --predict IMAGES{hint}   (detections on any images; scores are in "
                "metrics.json)",
    "mutdet": "python train.py --stage finetune --init {run}   (paper: --preset paper --data rgb:data/DIOR_R_dota)",
    "sam": "python train.py --stage mutdet --data {run}",
}


def shutdown_distributed():
    barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Run folders, schedules and optimizer groups
# ---------------------------------------------------------------------------------------------

def continues_from_checkpoint(cfg) -> bool:
    """`--resume RUN` with a checkpoint of its own: the run goes on from it. A folder stopped before
    its first checkpoint starts over as a fresh run (`resume`), from the config's weights."""
    return bool(cfg.resume) and checkpoint_pair(Path(cfg.resume)) is not None


def start_weights(cfg) -> dict:
    """The one place that decides which weight files a run loads before its first step, as
    {config field: path, or "" for none}, "fractal" resolved to its stand-in file (`standin`).
    A run that continues from its checkpoint loads every weight from that checkpoint, so here it
    loads none, whatever its weight fields hold: a stand-in name, a path that has since moved or
    been deleted, an InternVL folder. (The sam stage has no checkpoint: a rerun skips the images
    already done and needs its models for the rest; csia's `--llm` also gives the LM's shape, which
    a continuing run reads from its folder, `csia`.)"""
    if isinstance(cfg, SAMConfig):
        return dict(resnet=standin(cfg.resnet, cfg.embed_backbone), sam=cfg.sam)
    fields = {CSIAConfig: ("vit", "init"), FinetuneConfig: ("resnet", "init"), MutDetConfig: ("resnet", "init")}[type(cfg)]
    if continues_from_checkpoint(cfg):
        return dict.fromkeys(fields, "")
    if isinstance(cfg, CSIAConfig):  # --init (a csia run, an InternVL folder) holds a ViT already
        return dict(vit="" if cfg.init else standin(cfg.vit, "vit"), init=cfg.init)
    if isinstance(cfg, FinetuneConfig) and cfg.backbone == "vit":  # the ViT's weights come through --init
        init = standin(cfg.init, "vit")
        return dict(resnet="", init=init)
    if cfg.init == "fractal":
        raise datasets.DatasetError("--init fractal: the ViT backbone's stand-in; a ResNet takes --resnet fractal")
    return dict(resnet=standin(cfg.resnet, cfg.backbone), init=cfg.init)


def write_config(run: Path, cfg, weights: dict = None) -> None:
    """config.json: the stage and the resolved config, so that `--resume RUN` needs nothing else; the
    machine it ran on (`machine`), the code's commit and the SHA-256 of every weight file it started
    from (`weights`: `start_weights`' result; a resumed run keeps the record of its start)."""
    stage = next(name for name, (cls, _) in STAGES.items() if isinstance(cfg, cls))
    previous = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    loaded = datasets.weight_hashes(weights) if weights and any(weights.values()) else previous.get("weights", {})
    datasets.atomic_write_text(run / "config.json", json.dumps(dict(
        stage=stage, **dataclasses.asdict(cfg), machine=datasets.machine(), commit=datasets.code_version(), weights=loaded),
        indent=2) + "\n")


def accumulation(global_batch: int, micro: int, world: int) -> int:
    """Micro-batches per optimizer step so that `world` processes of `micro` samples each make up
    the global batch; a one-line error when it does not divide evenly."""
    if global_batch % (micro * world):
        raise SystemExit(f"error: --global_batch {global_batch} is not a multiple of {micro} samples a micro-batch x "
                         f"{world} processes; choose a global batch, micro-batch (--batch_size / --source_ratio) and "
                         "process count that divide")
    return global_batch // (micro * world)


def run_folder(cfg, stage: str, rank: int) -> Path:
    run = Path(cfg.resume or cfg.out or f"runs/{stage}-{time.strftime('%Y%m%d-%H%M%S')}")
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
    barrier()
    return run


def lr_at(step: int, cfg, steps_per_epoch: int) -> float:
    """Linear warm-up from warmup_ratio·lr over `warmup` steps (mmcv), then ×0.1 at each epoch in lr_steps."""
    factor = 0.1 ** sum(step >= e * steps_per_epoch for e in cfg.lr_steps)
    if step < cfg.warmup:
        factor *= 1 - (1 - cfg.warmup_ratio) * (1 - step / cfg.warmup)
    return cfg.lr * factor


FUSED_ADAMW = True  # AdamW in one kernel over all parameters: 4x faster on the CPU, the same update to 1e-8


def param_groups(model, cfg) -> list:
    """AdamW groups: lr × lr_mult for parameters whose name holds one of lr_mult_keys (ARS-DETR:
    backbone, sampling offsets, reference points), the base lr for the rest."""
    slow, fast = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (slow if any(k in name for k in cfg.lr_mult_keys) else fast).append(p)
    return [dict(params=fast, lr_mult=1.0), dict(params=slow, lr_mult=cfg.lr_mult)]


def cosine_lr(step: int, cfg) -> float:
    """HF Trainer's schedule: linear warm-up from 0 over warmup_ratio·steps, then cosine to 0."""
    warmup = int(math.ceil(cfg.warmup_ratio * cfg.steps))
    if step < warmup:
        return cfg.lr * step / warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))


# ---------------------------------------------------------------------------------------------
# The csia stage (BabelRS Sec. 3.1-3.2)
# ---------------------------------------------------------------------------------------------

def csia(cfg: CSIAConfig) -> int:
    """The csia stage. Its run folder holds the corpus and tokenizer before the models are built, so
    a data or weight error met on the way removes the folder it made (`csia_run` does the work)."""
    run = Path(cfg.resume or cfg.out or f"runs/csia-{time.strftime('%Y%m%d-%H%M%S')}")
    fresh = not run.exists()
    try:
        return csia_run(cfg if cfg.resume else dataclasses.replace(cfg, out=str(run)))
    except datasets.DatasetError:
        if fresh and checkpoint_pair(run) is None and int(os.environ.get("RANK", "0")) == 0:
            import shutil
            shutil.rmtree(run, ignore_errors=True)
        raise


def csia_run(cfg: CSIAConfig) -> int:
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    entries = [cfg.data] if isinstance(cfg.data, str) else list(cfg.data)  # configs before the list form
    entries = [e for e in entries if e]
    run = None
    if not entries:
        root = Path(cfg.synth_root)
        if rank == 0:
            datasets.make_synthetic(root)
        barrier()
        meta = str(root / "instructions" / "meta.json")
    elif len(entries) == 1 and entries[0].endswith(".json"):
        meta = entries[0]
    else:  # detection sets: the corpus is built into (and reused from) the run folder
        sources = babelrs.instruction_sources(entries)
        run = run_folder(cfg, "csia", rank)
        meta = str(run / "corpus" / "meta.json")
        if rank == 0 and not Path(meta).exists():
            babelrs.corpus_from_detection_sets(sources, run / "corpus", dict(rgb=cfg.rate_rgb, sar=cfg.rate_sar,
                                               ir=cfg.rate_ir), cfg.concept_map, cfg.seed)
        barrier()
    records = babelrs.read_instruction_meta(meta)
    run = run or run_folder(cfg, "csia", rank)
    # the LM's tokenizer: --llm's, else an InternVL --init's own (the official CSIA's), else trained here
    vocab_from = cfg.llm or (cfg.init if babelrs.internvl_llm_config(cfg.init) else "")
    if rank == 0:  # one process trains (or adapts) and stores the tokenizer; the others read it back
        tokenizer = babelrs.load_tokenizer(run, records, vocab_from, cfg.vocab_size)
    barrier()
    if rank != 0:
        tokenizer = babelrs.load_tokenizer(run, records, vocab_from, cfg.vocab_size)
    try:
        vit = babelrs.ViT(cfg.vit_dim, cfg.vit_depth, cfg.vit_heads, cfg.patch, cfg.image_size,
                          drop_path=cfg.drop_path, grad_checkpoint=cfg.grad_checkpoint)
        weights = start_weights(cfg)
        if weights["vit"]:
            babelrs.load_vit_weights(vit, weights["vit"])
        # an LM folder gives the LM's shape and weights; a continuing run has the shape in its own folder
        # (stored at its start) and the weights in its checkpoint, so the folder may have moved since
        stored_llm = run / "llm" / "config.json"
        internvl = babelrs.internvl_llm_config(cfg.init)
        if (cfg.llm or internvl) and continues_from_checkpoint(cfg) and stored_llm.exists():
            llm = babelrs.llm_from_config(stored_llm.parent)
        elif internvl and not cfg.llm:  # as the official code: the LM of the InternVL checkpoint it continues
            llm = babelrs.llm_from_internvl(cfg.init)
        else:
            llm = babelrs.build_llm(cfg.llm, len(tokenizer), cfg.llm_dim, cfg.llm_layers, cfg.llm_heads,
                                    cfg.llm_kv_heads, cfg.llm_ffn)
        if (cfg.llm or internvl) and rank == 0 and not stored_llm.exists():
            llm.config.save_pretrained(str(stored_llm.parent))
    except (ValueError, OSError) as e:
        raise datasets.DatasetError(str(e)) from None
    if llm.get_input_embeddings().num_embeddings < len(tokenizer):
        llm.resize_token_embeddings(len(tokenizer))
    model = babelrs.CSIA(vit, llm, tokenizer.convert_tokens_to_ids(babelrs.IMG_CONTEXT), cfg.merge,
                         tuple(cfg.layers), cfg.tau).to(device)
    if weights["init"]:  # an InternVL folder names its parts vision_model / mlp1 / language_model
        try:
            state = {k.replace("vision_model.", "vit.", 1).replace("language_model.", "llm.", 1): v
                     for k, v in detection.read_weights(weights["init"]).items()}
            # at paper scale every tensor of the checkpoint must land: a skipped embedding (an LM of another
            # vocabulary) would leave the continued model half random
            paper = cfg.vit_dim >= 1024
            detection.load_init(model, weights["init"], state, cfg.init_strict,
                                strict_shapes=paper and not cfg.init_strict)
        except (ValueError, FileNotFoundError) as e:
            raise datasets.DatasetError(str(e)) from None
    tokens_per_tile = (cfg.image_size // cfg.patch) ** 2 // 4
    if cfg.shuffle_answers:  # after the tokenizer, which is then the same as the real run's
        records = babelrs.shuffle_answers(records, cfg.seed)
    data = babelrs.InstructionDataset(records, tokenizer, cfg.image_size, tokens_per_tile, cfg.max_tiles, cfg.max_length)
    sampler = datasets.MultiSourceSampler([len(data)], [cfg.batch_size], cfg.seed, rank, world)
    accum = accumulation(cfg.global_batch, cfg.batch_size, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=FUSED_ADAMW)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start = resume(run, model, optimizer, scaler, rank) if cfg.resume else 0
    if rank == 0:
        write_config(run, cfg, weights)
        modalities = sorted({r["modality"] for r in records})
        print(f"csia: {len(records)} instruction samples ({', '.join(modalities)}), "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {tokens_per_tile} tokens a tile")

    def forward(net, batch, step):
        out = net(batch["pixels"].to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device),
                  batch["labels"].to(device), step=step)
        return dict(loss_align=out["loss"]), dict(alpha=out["alpha"])

    end = min(cfg.steps, cfg.max_steps) if cfg.max_steps else cfg.steps
    status = train_steps(cfg, run, model, optimizer, scaler, babelrs.InstructionBatches(data, sampler, accum, tokenizer.pad_token_id),
                         start, end, lambda step: cosine_lr(step, cfg), forward,
                         cfg.global_batch, "csia",
                         # blocks after the last LVSA layer get no gradient (block 24 with the official layers)
                         find_unused=max(cfg.layers) < cfg.vit_depth or cfg.merge == "last")
    shutdown_distributed()
    return status


# ---------------------------------------------------------------------------------------------
# The finetune stage (BabelRS Sec. 3.3; MutDet's fine-tuning on DIOR-R / DOTA)
# ---------------------------------------------------------------------------------------------

def resolve_sources(cfg: FinetuneConfig, rank: int) -> list:
    """--data MODALITY:PATH entries (or SynthSOI, written by one process) -> datasets.detection_sources."""
    if not cfg.data:
        if rank == 0:
            datasets.make_synthetic(cfg.synth_root)
        barrier()
    return datasets.detection_sources(list(cfg.data), cfg.synth_root, cfg.synth_modalities)


def model_args(cfg: FinetuneConfig, sources: list) -> dict:
    """The keyword arguments of `babelrs.build_detector`, stored as model.json for eval.py."""
    weights = {s["modality"]: (cfg.loss_weights[i] if i < len(cfg.loss_weights) else 1.0) for i, s in enumerate(sources)}
    return dict(sources=[dict(modality=s["modality"], classes=s["classes"], box_type=s["box_type"]) for s in sources],
                backbone=cfg.backbone, resnet=cfg.resnet, frozen_bn=cfg.frozen_bn, dim=cfg.dim, heads=cfg.heads,
                levels=cfg.levels, points=cfg.points, enc_layers=cfg.enc_layers, dec_layers=cfg.dec_layers,
                ffn=cfg.ffn, dropout=cfg.dropout, num_queries=cfg.num_queries, num_dn_queries=cfg.num_dn_queries,
                gn_groups=cfg.gn_groups, loss_weights=weights, match_costs=list(cfg.match_costs), match_l1=cfg.match_l1,
                vit_args=dict(dim=cfg.vit_dim, depth=cfg.vit_depth, heads=cfg.vit_heads, patch=cfg.vit_patch,
                              image_size=cfg.image_size, grad_checkpoint=cfg.grad_checkpoint,
                              **babelrs.VIT_FAMILIES[cfg.vit_family])
                if cfg.backbone == "vit" else None, vit_taps=list(cfg.vit_taps), vit_pyramid=cfg.vit_pyramid)


BABELRS_ORDER = ("sar", "rgb", "ir")  # the order of the babelrs presets' 2 : 1 : 1 ratio and loss weights


def modality_subset(cfg: FinetuneConfig, sources: list, rank: int) -> FinetuneConfig:
    """A babelrs preset (three values of --source_ratio / --loss_weights, SAR, RGB, IR) trained on one or
    two of the modalities: each present modality keeps its share and weight (SAR + RGB: 2 : 1), and a
    step keeps its number of micro-batches (8 of 2 + 1 + 1 = 32 images -> 8 of 2 + 1 = 24); said once."""
    mods = [s["modality"] for s in sources]
    if len(cfg.source_ratio) != 3 or not 0 < len(mods) < 3 or len(set(mods)) != len(mods):
        return cfg
    pick = [BABELRS_ORDER.index(m) for m in mods]
    micro_steps = max(1, cfg.global_batch // sum(cfg.source_ratio))
    ratio = [cfg.source_ratio[i] for i in pick]
    weights = [cfg.loss_weights[i] for i in pick] if len(cfg.loss_weights) == 3 else list(cfg.loss_weights)
    if rank == 0:
        print(f"modalities {' + '.join(mods)} of SAR, RGB, IR: ratio {' : '.join(map(str, ratio))}, loss weights "
              f"{weights or 'equal'}, global batch {micro_steps * sum(ratio)} ({micro_steps} micro-batches a step, as "
              f"{cfg.global_batch} of {sum(cfg.source_ratio)}); H-mAP is over the modalities present")
    return dataclasses.replace(cfg, source_ratio=ratio, loss_weights=weights, global_batch=micro_steps * sum(ratio))


def finetune(cfg: FinetuneConfig) -> int:
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    sources = resolve_sources(cfg, rank)
    splits = []
    for i, s in enumerate(sources):
        ds = datasets.load_detection_split(s["train"], s["modality"], s.get("classes"))  # --data ...:CLASS_SET
        if cfg.filter_empty:
            kept = [smp for smp in ds.samples if len(smp.labels)]
            if rank == 0 and len(kept) < len(ds.samples):
                print(f"{s['train']}: {len(ds.samples) - len(kept)} training images without objects left out "
                      "(filter_empty_gt, as the official configs; --no-filter-empty keeps them)")
            ds = dataclasses.replace(ds, samples=kept)
        ds = datasets.subset(ds, cfg.data_fraction, cfg.seed)
        ds.source = i
        s.update(classes=ds.classes, box_type=ds.box_type, train_images=len(ds))
        splits.append(ds)
        if rank == 0 and ds.report():
            print(ds.report())
    cfg = modality_subset(cfg, sources, rank)
    if cfg.source_ratio and len(cfg.source_ratio) != len(sources):
        raise SystemExit(f"error: --source_ratio needs one value per --data source ({len(sources)}), got {cfg.source_ratio}")
    ratios = list(cfg.source_ratio) or ([cfg.batch_size] if len(sources) == 1 else [1] * len(sources))
    accum = accumulation(cfg.global_batch, sum(ratios), world)
    per_step = cfg.global_batch
    steps_per_epoch = max(1, sum(len(d) for d in splits) // per_step)
    total = cfg.epochs * steps_per_epoch
    end = min(total, cfg.max_steps) if cfg.max_steps else total

    weights = start_weights(cfg)
    margs = dict(model_args(cfg, sources), resnet=weights["resnet"])
    init = weights["init"]
    try:
        model = babelrs.build_detector(**margs).to(device)
        if init:
            state = detection.read_weights(init)
            if detection.is_mmrotate_state(state):  # a released ARS-DETR / MutDet checkpoint (mmrotate names)
                mutdet.load_official(model, init, state)
            elif any(k.startswith("detector.") for k in state):  # a mutdet run: its detector, class heads afresh
                state, dropped = mutdet.pretrained_detector(state, list(model.heads))
                groups = {}
                for k in dropped:
                    group = k.split(".")[0] if not k.startswith("detector.") else "class head (pseudo-classes)"
                    groups[group] = groups.get(group, 0) + 1
                print(f"--init {init}: a MutDet pre-training run; dropped " +
                      ", ".join(f"{g} ({n} tensors)" for g, n in groups.items()))
                detection.load_init(model, init, state, cfg.init_strict)
            elif cfg.backbone == "vit" and not any(k.startswith(("heads.", "backbone.")) for k in state):
                # the ViT of a csia run, the BabelRS release, InternVL, or a transformers CLIP / DINOv2
                babelrs.load_vit_weights(model.backbone.vit, init, family=cfg.vit_family)
                print(f"--init {init}: loaded the ViT (patch and positions resized to {cfg.vit_patch} px, "
                      f"{cfg.image_size // cfg.vit_patch}^2 grid)")
            else:
                detection.load_init(model, init, state, cfg.init_strict)
    except (ValueError, FileNotFoundError) as e:  # a weight file that is missing or of another model
        raise datasets.DatasetError(str(e)) from None
    run = run_folder(cfg, "finetune", rank)  # only now: a bad weight file leaves no empty run folder
    if cfg.backbone == "vit":
        groups = babelrs.layer_decay_groups(model, "backbone.vit.", cfg.vit_depth, cfg.layer_decay, cfg.weight_decay)
    else:
        groups = param_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=FUSED_ADAMW)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    sampler = datasets.MultiSourceSampler([len(d) for d in splits], ratios, cfg.seed, rank, world)
    start = resume(run, model, optimizer, scaler, rank) if cfg.resume else 0
    stored_sources = [dict(m, root=s["root"], train=s["train"], test=s["test"], image_size=cfg.image_size)
                      for m, s in zip(margs["sources"], sources)]
    if rank == 0:
        write_config(run, cfg, weights)
        datasets.atomic_write_text(run / "model.json", json.dumps(dict(margs, sources=stored_sources), indent=2) + "\n")

    def forward(net, batch, step):
        targets = [dict(boxes=b, labels=l, size=s) for b, l, s in zip(batch["boxes"], batch["labels"], batch["size"])]
        return net(batch["images"].to(device), batch["masks"].to(device), batch["modality"], targets)["losses"], {}

    def after_step(done, log, bar):
        if cfg.eval_every and done % cfg.eval_every == 0 and rank == 0:
            m = evaluation.evaluate_model(model, stored_sources, device, progress=False)
            scores = {f"eval_{mod}_{k}": r[k] for mod, r in m["sources"].items() for k in ("ap50", "map", "voc07_ap50")}
            log.write(json.dumps(dict(step=done, **scores)) + "\n")
            bar.write(f"step {done}: " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()))

    batches = datasets.StepBatches(splits, sampler, cfg, rank, accum)
    status = train_steps(cfg, run, model, optimizer, scaler, batches, start, end,
                         lambda step: lr_at(step, cfg, steps_per_epoch), forward, per_step, "finetune", after_step,
                         # blocks after the last one the pyramid reads get no gradient
                         find_unused=cfg.backbone == "vit" and bool(cfg.vit_taps) and max(cfg.vit_taps) < cfg.vit_depth,
                         # a run with several head sets predicts with one of them
                         next_hint=f" --modality {sources[0]['modality']}" if len(sources) > 1 else "")
    if status == 0 and cfg.eval and rank == 0:
        evaluation.evaluate_run(run, device=device)
    shutdown_distributed()
    return status


# ---------------------------------------------------------------------------------------------
# The sam stage (MutDet pseudo-labels)
# ---------------------------------------------------------------------------------------------

def sam_stage(cfg: SAMConfig) -> int:
    """Phase 1, per image (skipped when its file exists, so a rerun resumes): SAM masks ->
    proposals -> object embeddings, into raw/<image>.safetensors. Phase 2: PCA + k-means fitted on
    a sample of all features, then cache/<image>.safetensors (boxes, labels, embeds, filtered
    together) and manifest.json."""
    from tqdm import tqdm
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    fin = FinetuneConfig(data=cfg.data, synth_root=cfg.synth_root)
    sources = resolve_sources(fin, 0)
    samples = [(s["modality"], smp) for s in sources for smp in datasets.load_detection_split(s["train"], s["modality"]).samples]
    if cfg.max_steps:
        samples = samples[:cfg.max_steps]
    try:  # the models first: a missing weight file leaves no run folder behind
        weights = start_weights(cfg)
        sam = mutdet.build_sam(weights["sam"], cfg.sam_image_size) if (cfg.proposals, cfg.masks) == ("sam", "sam") else None
        trunk = mutdet.resnet_trunk(cfg.embed_backbone, weights["resnet"])
        if cfg.proposals == "random" and not cfg.proposals_like:
            raise ValueError("--proposals random draws its box counts and sizes from a sam run: give --proposals_like RUN")
        stats = mutdet.proposal_statistics(cfg.proposals_like) if cfg.proposals == "random" else None
    except (ValueError, OSError) as e:
        raise datasets.DatasetError(str(e)) from None
    run = run_folder(dataclasses.replace(cfg, out=cfg.resume or cfg.out), "sam", 0)
    (run / "raw").mkdir(exist_ok=True)
    (run / "cache").mkdir(exist_ok=True)
    write_config(run, cfg, weights)
    norm = datasets.Normalize()
    log = open(run / "log.jsonl", "a")
    bar = tqdm(samples, desc="sam", unit="img", dynamic_ncols=True)
    for i, (modality, smp) in enumerate(bar):
        raw = run / "raw" / f"{smp.name}.safetensors"
        if raw.exists():
            continue
        t0 = time.time()
        image = torch.from_numpy(datasets.load_image(smp.image)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        if cfg.proposals == "random":  # seeded per image, so that a resumed run draws the same boxes
            g = torch.Generator().manual_seed(cfg.seed * 100003 + i)
            masks = boxes = mutdet.random_proposals(stats, *image.shape[-2:], g)[:cfg.max_boxes]
        elif cfg.proposals == "selective":
            masks = boxes = mutdet.selective_search(image.permute(1, 2, 0).numpy(), cfg.ss_k, max_boxes=cfg.max_boxes,
                                                    seed=cfg.seed + i)
        else:
            masks = mutdet.generate_masks(sam, image, cfg.points_per_side, cfg.points_per_batch, cfg.pred_iou_thresh,
                                          cfg.stability_score_thresh, cfg.stability_score_offset,
                                          cfg.box_nms_thresh)["masks"] if cfg.masks == "sam" else mutdet.colour_components(image)
            boxes, _ = mutdet.proposals_from_masks(masks, cfg.max_boxes)
        # crops from the resized, normalised image (the detector's input), boxes scaled alike
        item = datasets.Resize(cfg.image_size)(dict(image=image, boxes=boxes.float(), labels=torch.zeros(len(boxes)),
                                                    difficult=torch.zeros(len(boxes), dtype=torch.bool)))
        feats = mutdet.object_embeddings(norm(item)["image"], item["boxes"].double(), trunk, cfg.crop, cfg.context)
        datasets.save_tensors_atomic(raw, dict(boxes=boxes.float(), feats=feats.float()))  # (K, 5), (K, C)
        log.write(json.dumps(dict(image=smp.name, masks=len(masks), boxes=len(boxes),
                                  seconds=time.time() - t0)) + "\n")
        log.flush()
    bar.close()
    log.close()
    # phase 2: PCA to pca_dim and L2 normalisation, spherical k-means, one label per box
    images = mutdet.pseudo_label_cache(run, samples, cfg.clusters, cfg.pca_dim, cfg.fit_samples, cfg.seed)
    n = sum(i["boxes"] for i in images)
    print(f"sam cache: {len(images)} images, {n} boxes, {cfg.clusters} pseudo-classes, {cfg.pca_dim}-d embeddings -> {run}")
    print("next: " + NEXT_COMMAND["sam"].format(run=run))
    return 0


# ---------------------------------------------------------------------------------------------
# The mutdet stage (MutDet detection pre-training)
# ---------------------------------------------------------------------------------------------

def synth_sam_cache(cfg: MutDetConfig, rank: int) -> str:
    """SynthSOI-RGB train through the sam stage's tiny preset, once (reused by later runs)."""
    cache = Path(f"{cfg.synth_root}-sam-{cfg.dim}d")
    if rank == 0:
        with datasets.folder_lock(cache):  # built once, whoever asks first; the others wait for it
            if not (cache / "manifest.json").exists():
                print(f"mutdet: no --data; caching SynthSOI-RGB's SAM proposals first in {cache}")
                status = sam_stage(dataclasses.replace(SAM_PRESETS["tiny"], synth_root=cfg.synth_root, out=str(cache),
                                                       pca_dim=cfg.dim, seed=cfg.seed))
                if status:
                    raise SystemExit(status)
    barrier()
    return str(cache)


def mutdet_stage(cfg: MutDetConfig) -> int:
    rank, world, device = setup_distributed()
    cache = cfg.data or synth_sam_cache(cfg, rank)  # seeds its own generators: seed ours after it, so a run
    torch.manual_seed(cfg.seed + rank)              # that builds the cache starts as one that finds it
    random.seed(cfg.seed + rank)
    if cfg.pseudo_classes < 0:
        raise SystemExit("error: --pseudo_classes must be 0 (the cache's clusters), 1 or the cache's count")
    data = mutdet.PseudoLabels(cache, class_agnostic=cfg.pseudo_classes == 1)
    if cfg.pseudo_classes > 1 and cfg.pseudo_classes != len(data.clusters):
        raise datasets.DatasetError(f"{cache}: holds {len(data.clusters)} k-means clusters, not --pseudo_classes "
                                    f"{cfg.pseudo_classes}; rerun the sam stage with --clusters {cfg.pseudo_classes}")
    try:
        weights = start_weights(cfg)
        model = mutdet.build_pretrainer(cfg, data.classes, data.embed_dim, weights["resnet"], data.modality).to(device)
        if weights["init"]:
            detection.load_init(model, weights["init"], strict=cfg.init_strict)
    except (ValueError, FileNotFoundError) as e:  # embeddings of another width, a bad weight file
        raise datasets.DatasetError(f"{cache}: {e}" if "embeddings" in str(e) else str(e)) from None
    run = run_folder(cfg, "mutdet", rank)
    accum = accumulation(cfg.global_batch, cfg.batch_size, world)
    per_step = cfg.global_batch
    steps_per_epoch = max(1, len(data) // per_step)
    total = cfg.epochs * steps_per_epoch
    end = min(total, cfg.max_steps) if cfg.max_steps else total
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=FUSED_ADAMW)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start = resume(run, model, optimizer, scaler, rank) if cfg.resume else 0
    if rank == 0:
        write_config(run, cfg, weights)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"mutdet: {len(data)} images of {cache}, {len(data.classes)} classes, {trained / 1e6:.1f}M trained "
              f"parameters, {end} steps ({steps_per_epoch} an epoch)")

    def forward(net, batch, step):
        targets = [dict(boxes=b, labels=l, size=s, embeds=e)
                   for b, l, s, e in zip(batch["boxes"], batch["labels"], batch["size"], batch["embeds"])]
        return net(batch["images"].to(device), batch["masks"].to(device), targets), {}

    sampler = datasets.MultiSourceSampler([len(data)], [cfg.batch_size], cfg.seed, rank, world)
    status = train_steps(cfg, run, model, optimizer, scaler, datasets.StepBatches([data], sampler, cfg, rank, accum), start, end,
                         lambda step: lr_at(step, cfg, steps_per_epoch), forward, per_step, "mutdet",
                         find_unused=True)  # an ablation row leaves modules unused (no enhancement, no alignment)
    shutdown_distributed()
    return status


# ---------------------------------------------------------------------------------------------
# The fractal stage: formula-driven stand-ins for the papers' pretrained weights
# Both papers start from pretrained knowledge (MutDet: a frozen ImageNet ResNet-50 and its object
# embeddings; BabelRS: InternVL2.5). The hub is not reachable at run time, and random weights leave
# pre-training nothing to transfer, so the tiny presets start from FractalDB-style pre-training
# (datasets.render_fractals): generic visual features learned from formulas alone. Each tiny
# preset's weight field holds "fractal" and resolves to the shipped half-precision file
# STANDINS/fractal-<model>.safetensors, built once by `--stage fractal --preset <model> --ship`
# (its record, fractal-<model>.json: the command, commit, SHA-256, accuracy, first losses). Nothing
# builds one at first use. An empty value is random init.

STANDINS = str(Path(__file__).resolve().parent / "weights")  # the shipped stand-ins


@dataclass
class FractalConfig:
    """FractalDB-style pre-training (Kataoka et al., ACCV 2020): classify images of random iterated
    function systems; writes the backbone as an ordinary weight file (torchvision ResNet names, or
    InternViT names) beside the run's own checkpoint."""
    model: Literal["resnet18", "resnet50", "vit"] = "resnet18"  # the tiny presets' ResNet-18 / ViT
    classes: int = 64  # IFS categories; FractalDB-1k: 1000
    image_size: int = 48  # FractalDB: 362, cropped 224
    batch_size: int = 128  # FractalDB (ResNet-50): 256
    steps: int = 300  # optimizer steps; each draws a new batch (instances are never repeated)
    lr: float = 2e-3  # AdamW, linear warm-up then cosine to 0
    weight_decay: float = 0.05  # AdamW
    warmup_ratio: float = 0.1  # fraction of the steps of linear warm-up from 0
    label_smoothing: float = 0.1  # of the cross-entropy
    clip: float = 5.0  # max L2 norm of all gradients
    vit_dim: int = 64  # the ViT's width (= the tiny csia / babelrs-tiny ViT)
    vit_depth: int = 4  # its blocks
    vit_heads: int = 4  # its attention heads
    vit_patch: int = 8  # its patch side
    test_batches: int = 8  # held-out batches (new instances of the same categories) for the accuracy
    seed: int = 0  # the categories and the image stream
    amp: Literal["off", "bf16", "fp16"] = "off"  # autocast (FractalDB on a GPU: bf16)
    max_steps: int = 0  # stop after this many steps (0 = the whole schedule)
    workers: int = 0  # data loading processes
    out: str = ""  # run folder; default runs/fractal/<model>
    resume: str = ""  # run folder to continue
    ckpt_every: int = 100  # steps between checkpoints (and one at the end)
    ship: bool = False  # at the end, also write the half-precision stand-in the tiny presets load (STANDINS)


FRACTAL_PRESETS = {
    "tiny": FractalConfig(),  # the ResNet-18 stand-in: about 8.5 min here
    # the ViT stand-in at the token grid fine-tuning uses (192 px, patch 16: 12 x 12; tiny protocol v3's gate)
    "vit": FractalConfig(model="vit", image_size=192, vit_patch=16, steps=2400, ckpt_every=200),
    # FractalDB-1k: 1000 categories, ResNet-50 at 224 px, 90 epochs of 1M images at batch 256
    "paper": FractalConfig(model="resnet50", classes=1000, image_size=224, batch_size=256, steps=351_000, lr=1e-3,
                           vit_dim=1024, vit_depth=24, vit_heads=16, vit_patch=14, ckpt_every=5000, workers=4),
}
STANDIN_PRESETS = {"resnet18": "tiny", "vit": "vit"}  # the fractal preset that builds each shipped stand-in


def fractal_model(cfg: FractalConfig) -> torch.nn.Module:
    import torchvision
    if cfg.model == "vit":
        return babelrs.ViTClassifier(cfg.vit_dim, cfg.vit_depth, cfg.vit_heads, cfg.vit_patch, cfg.image_size,
                                     cfg.classes)
    return getattr(torchvision.models, cfg.model)(weights=None, num_classes=cfg.classes)


def standin_state(model: torch.nn.Module, cfg: FractalConfig) -> dict:
    """The backbone's weights as its consumers load them: torchvision names without `fc`, or InternViT names."""
    state = model.state_dict()
    if cfg.model == "vit":
        return {k.removeprefix("vit."): v for k, v in state.items() if k.startswith("vit.")}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


@torch.no_grad()
def fractal_accuracy(model, systems: torch.Tensor, cfg: FractalConfig, device) -> float:
    """Top-1 accuracy on held-out instances (another image stream) of the training categories."""
    model.eval()
    test = datasets.FractalImages(systems, cfg.batch_size, cfg.image_size, cfg.seed, split="test")
    right = total = 0
    for k in range(cfg.test_batches):
        b = test[k]
        right += (model(b["images"].to(device)).argmax(1).cpu() == b["labels"]).sum().item()
        total += len(b["labels"])
    model.train()
    return right / max(total, 1)


def fractal_stage(cfg: FractalConfig) -> int:
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    if not cfg.out and not cfg.resume:
        cfg = dataclasses.replace(cfg, out=f"runs/fractal/{cfg.model}")
    run = run_folder(cfg, "fractal", rank)
    systems = datasets.ifs_categories(cfg.classes, cfg.seed)  # (classes, maps, 2, 3), from the seed alone
    model = fractal_model(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=FUSED_ADAMW)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start = resume(run, model, optimizer, scaler, rank) if cfg.resume else 0
    if rank == 0:
        write_config(run, cfg)
        print(f"fractal: {cfg.model}, {cfg.classes} IFS categories, {cfg.image_size}-px images, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")

    def forward(net, batch, step):
        logits = net(batch["images"].to(device))
        return dict(loss_cls=F.cross_entropy(logits, batch["labels"].to(device), label_smoothing=cfg.label_smoothing)), {}

    micro = cfg.batch_size // world  # each process renders its own share of batch k
    batches = datasets.FractalImages(systems, micro, cfg.image_size, cfg.seed * 1000 + rank)
    end = min(cfg.steps, cfg.max_steps) if cfg.max_steps else cfg.steps
    status = train_steps(cfg, run, model, optimizer, scaler, batches, start, end, lambda step: cosine_lr(step, cfg),
                         forward, cfg.batch_size, "fractal")
    if status == 0 and rank == 0 and end == cfg.steps:
        accuracy = fractal_accuracy(model, systems, cfg, device)
        datasets.save_tensors_atomic(run / f"{cfg.model}.safetensors", standin_state(model, cfg))
        datasets.atomic_write_text(run / "accuracy.json", json.dumps(dict(
            held_out_top1=accuracy, chance=1 / cfg.classes, images=cfg.test_batches * cfg.batch_size)) + "\n")
        print(f"fractal: held-out top-1 {100 * accuracy:.1f} % ({cfg.classes} categories, chance "
              f"{100 / cfg.classes:.1f} %); weights {run / (cfg.model + '.safetensors')}")
        if cfg.ship:
            ship_standin(run, model, systems, cfg, device)
    shutdown_distributed()
    return status


def ship_standin(run: Path, model, systems, cfg: FractalConfig, device) -> None:
    """STANDINS/fractal-<model>.safetensors (half precision) and its record: the build command and
    commit, the SHA-256, the held-out top-1 of the half-precision weights, and the first 3 losses
    (a test rebuilds those steps)."""
    import hashlib
    path = Path(STANDINS) / f"fractal-{cfg.model}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.save_tensors_atomic(path, {k: v.half() for k, v in standin_state(model, cfg).items()})
    with torch.no_grad():  # what a user gets: the weights rounded to half precision
        for p in model.parameters():
            p.copy_(p.half().float())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    config = json.loads((run / "config.json").read_text())
    datasets.atomic_write_text(path.with_suffix(".json"), json.dumps(dict(
        command=f"python train.py --stage fractal --preset {STANDIN_PRESETS[cfg.model]} --ship",
        commit=config.get("commit", ""), sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        held_out_top1_half=fractal_accuracy(model, systems, cfg, device), first_losses=[r["loss"] for r in log[:3]],
        steps=cfg.steps, threads=config.get("machine", {}).get("threads"),
        settings={k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "resume", "ship")}), indent=2) + "\n")
    print(f"fractal: shipped {path} and its record {path.with_suffix('.json').name}")


def standin(value: str, model: str) -> str:
    """A weight field's value: "fractal" -> the shipped stand-in file of `model`; anything else as it is."""
    if value != "fractal":
        return value
    path = Path(STANDINS) / f"fractal-{model}.safetensors"
    if not path.exists():
        how = (f"build it with python train.py --stage fractal --preset {STANDIN_PRESETS[model]} --ship"
               if model in STANDIN_PRESETS else "pass a weight file")
        raise datasets.DatasetError(f"{path}: no {model} stand-in; {how}, or give an empty value for random init")
    return str(path)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

PRESETS = {"finetune": FINETUNE_PRESETS, "csia": CSIA_PRESETS, "sam": SAM_PRESETS, "mutdet": MUTDET_PRESETS,
           "fractal": FRACTAL_PRESETS}
STAGES = {"finetune": (FinetuneConfig, finetune), "csia": (CSIAConfig, csia), "sam": (SAMConfig, sam_stage),
          "mutdet": (MutDetConfig, mutdet_stage), "fractal": (FractalConfig, fractal_stage)}


def parse_config(argv=None, check_weights: bool = True):
    """(stage, config) from the command line: the preset, then the flags given, or the stored
    config of --resume DIR with the flags given on top."""
    head = datasets.ArgumentParser(add_help=False)
    head.add_argument("--stage", choices=list(STAGES), default=None, help="default: the stage of --resume RUN, "
                      "else finetune")
    head.add_argument("--preset", default="tiny", help="tiny | paper (finetune: paper = MutDet's DIOR-R at 800 px; "
                      "also babelrs-tiny | babelrs | ars-detr-dota at 1024 px)")
    known, rest = head.parse_known_args(argv)
    peek = datasets.ArgumentParser(add_help=False)
    peek.add_argument("--resume", default="")
    resume = peek.parse_known_args(rest)[0].resume
    stored = None
    if resume:
        path = Path(resume) / "config.json"
        if not path.exists():
            raise datasets.DatasetError(f"{resume}: not a run folder (no config.json)")
        stored = json.loads(path.read_text())
        if known.stage and known.stage != evaluation.config_stage(stored):
            raise datasets.DatasetError(f"{resume}: a {evaluation.config_stage(stored)} run, not --stage {known.stage}")
        known.stage = evaluation.config_stage(stored)
    known.stage = known.stage or "finetune"
    cls, _ = STAGES[known.stage]
    if known.preset not in PRESETS[known.stage]:
        raise SystemExit(f"--preset {known.preset}: the {known.stage} stage has presets {', '.join(PRESETS[known.stage])}")
    parser = datasets.ArgumentParser(description=__doc__.split("\n")[0], parents=[head])
    datasets.add_config_flags(parser, cls, PRESETS[known.stage])
    given = vars(parser.parse_args(argv))
    given.pop("stage"), given.pop("preset")
    base = PRESETS[known.stage][known.preset]
    if stored is not None:
        names = {f.name for f in dataclasses.fields(cls)}
        base = cls(**{k: v for k, v in stored.items() if k in names})
    cfg = dataclasses.replace(base, **given)
    if getattr(cfg, "lr_scaling", "none") != "none" and stored is None:  # a resumed run has its lr scaled already
        reference = PRESETS[known.stage][known.preset].global_batch
        ratio = cfg.global_batch / reference
        lr = cfg.lr * (ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio))
        print(f"--lr_scaling {cfg.lr_scaling}: lr {cfg.lr:g} x {'' if cfg.lr_scaling == 'linear' else 'sqrt '}"
              f"({cfg.global_batch} / {reference}) = {lr:g} (stored in config.json)")
        cfg = dataclasses.replace(cfg, lr=lr)
    resnet = getattr(cfg, "resnet", None)
    if (check_weights and known.preset in ("paper", "ars-detr-dota") and known.stage in ("finetune", "mutdet", "sam")
            and not resume and not resnet and not getattr(cfg, "init", "")):
        # both papers start from ImageNet's ResNet-50; a random one is never what a paper preset means
        raise SystemExit(f"error: --stage {known.stage} --preset {known.preset} starts from ImageNet's ResNet-50: give "
                         "--resnet FILE (torchvision's resnet50-0676ba61.pth, ResNet50_Weights.IMAGENET1K_V1)"
                         + (" or --init a pre-trained detector" if known.stage != "sam" else ""))
    if (check_weights and known.stage == "csia" and known.preset == "paper" and not resume
            and not (cfg.init or (cfg.llm and cfg.vit))):
        # BabelRS continues InternVL2.5-1B; a paper-size run from random weights is never what is meant
        raise SystemExit("error: --stage csia --preset paper needs --init (the InternVL2.5-1B folder: its ViT, "
                         "projector, language model and tokenizer) or --llm (a causal LM folder) with --vit")
    return known.stage, cfg


def format_config(stage: str, cfg) -> str:
    """The resolved config as an aligned two-column table (the same values go to config.json)."""
    def show(v):
        if isinstance(v, list):
            return " ".join(map(str, v)) or "[]"
        return '""' if v == "" else str(v)
    rows = [("stage", stage)] + [(f.name, show(getattr(cfg, f.name))) for f in dataclasses.fields(cfg)]
    width = max(len(n) for n, _ in rows)
    return f"{type(cfg).__name__}:\n" + "\n".join(f"  {n:<{width}}  {v}" for n, v in rows)


def main(argv=None) -> int:
    try:
        return run_main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (a build, a cache), or twice inside it
        print("\ninterrupted: stopped at once; what was checkpointed or cached stays, and the same command "
              "(or --resume RUN) goes on from it", file=sys.stderr)
        return EXIT_INTERRUPTED


def run_main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--sweep" in argv:  # moved; no import of tables.py from here (DESIGN.md)
        print("error: the sweeps moved to tables.py: python tables.py --sweep NAME ...", file=sys.stderr)
        return 2
    try:
        stage, cfg = parse_config(argv)
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_config(stage, cfg))
        folder = cfg.resume or cfg.out  # a named run folder: one training (one torchrun) at a time
        lock = (datasets.folder_lock(folder, wait=False) if folder and int(os.environ.get("RANK", "0")) == 0
                else contextlib.nullcontext())  # under torchrun, rank 0 holds it for all
        with lock:
            return STAGES[stage][1](cfg)
    except datasets.DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_DATA


if __name__ == "__main__":
    sys.exit(main())
