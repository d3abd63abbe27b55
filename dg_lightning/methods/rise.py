"""RISE: Regularized Invariance with Semantic Embeddings (Huang et al., ICCV 2023,
"A Sentence Speaks a Thousand Images: Domain Generalization through Distilling CLIP with Language Guidance").

A frozen CLIP teacher is distilled into a smaller student, and the student's image embedding is
pulled towards CLIP's *text* embedding of the class, in absolute and in relative terms:

    T_k   = normalize(mean_t text(template_t(c_k)))   (7 templates; T~_k: the same, unnormalised)
    A_kj  = text("a {d_j} of a {c_k}")                (one anchor per source domain d_j)
    e     = W_e f(x),  s = W_c e,  W_c initialised from T
    t     = 100 * normalize(CLIP_img(x)) T^T
    L_KD  = tau^2 KL(softmax(t/tau) || softmax(s/tau))                     tau = 3
    L_CE  = CE(s, y)
    L_AD  = 1 - cos(e, T_y)
    L_RD  = 10 * MSE(softmax_j cos(e, A_yj), softmax_j cos(T~_y, A_yj))
    L     = w1 L_KD + w2 L_CE + w3 (L_AD + L_RD)

Followed: the official code, WisconsinAIVision/RISE ``train_rise.py`` (``Trainer.__init__``: the
prompts, anchors and classifier initialisation; ``Trainer._do_epoch``: the losses). As there:

* prompts use the class and domain names exactly as the data gives them (``"a art_painting of a
  dog"``; OfficeHome's ``"itap of a Alarm_Clock."``); ``readable_names: true`` writes underscores
  as spaces instead (``"a art painting of a dog"``);
* anchors are the source domains (``anchor_names`` replaces them by fixed words, as the official
  code does for VLCS and TerraIncognita: ``[bright photo, corrupted photo, dark photo, good photo]``);
* the classifier's weight starts as T (its bias as initialised), once, when the model is built
  for training: at the start of the first fit of a model that was not loaded from a checkpoint.
  A checkpoint (``load_from_checkpoint``, ``ckpt_path``) always keeps its trained classifier.

Class and anchor embeddings come from the data module's class and source-domain names, computed
once when a fit (or test) starts and cached (never per step). The teacher is loaded through
open_clip by model name (official: OpenAI's ``clip`` package, ViT-B/16), with weights from an
open_clip pretrained tag or a local checkpoint file (``clip_pretrained``; ``null`` gives random
weights, which is what the offline tests use).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dg_lightning.core.method import DGMethod

TEMPLATES = (
    "itap of a {c}.",
    "a bad photo of the {c}.",
    "a origami {c}.",
    "a photo of the large {c}.",
    "a {c} in a video game.",
    "art of the {c}.",
    "a photo of the small {c}.",
)
ANCHOR_TEMPLATE = "a {d} of a {c}"


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(softmax(t/tau) || softmax(s/tau)), averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.softmax(teacher_logits / tau, dim=1),
                    reduction="batchmean") * tau**2


def absolute_distance_loss(e: torch.Tensor, class_text: torch.Tensor) -> torch.Tensor:
    """mean_i (1 - cos(e_i, T_{y_i})); ``class_text`` holds the rows T_{y_i}."""
    return (1 - F.cosine_similarity(e, class_text, dim=1)).mean()


def relative_distance_loss(e: torch.Tensor, class_text_raw: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """10 * MSE(softmax_j cos(e_i, A_{y_i j}), softmax_j cos(T~_{y_i}, A_{y_i j})).

    ``class_text_raw``: (N, D) unnormalised class embeddings T~_{y_i}; ``anchors``: (N, J, D) A_{y_i j}.
    """
    student = F.softmax(F.cosine_similarity(e.unsqueeze(1), anchors, dim=2), dim=1)
    teacher = F.softmax(F.cosine_similarity(class_text_raw.unsqueeze(1), anchors, dim=2), dim=1)
    return 10.0 * F.mse_loss(student, teacher)


class RISE(DGMethod):
    """RISE on a timm student with an open_clip teacher (see module docstring).

    Args:
        clip_model: open_clip model name (official: ``ViT-B-16``).
        clip_pretrained: open_clip pretrained tag (e.g. ``openai``) or a local checkpoint path;
            ``null``: random weights (tests, offline machines).
        clip_image_size: input side of the teacher (``null``: the model's own, 224 for ViT-B-16).
        tau: distillation temperature (3).
        w_kd / w_ce / w_dist: w1, w2, w3 (PACS: (0.9, 0.1) or (0.8, 0.2); w3 in {0.5, 1, 2}).
        readable_names: prompts with ``_`` in class and domain names written as spaces (official: false).
        anchor_names: the words of the anchors ``"a {d} of a {c}"`` (``null``: the source-domain names).
        (everything else: :class:`DGMethod`)

    The frozen CLIP teacher is rebuilt from ``clip_model``/``clip_pretrained`` and kept out of checkpoints.
    """

    tasks = ("classification",)

    frozen_prefixes = ("teacher.",)

    def __init__(
        self,
        clip_model: str = "ViT-B-16",
        clip_pretrained: str | None = "openai",
        clip_image_size: int | None = None,
        tau: float = 3.0,
        w_kd: float = 0.9,
        w_ce: float = 0.1,
        w_dist: float = 1.0,
        readable_names: bool = False,
        anchor_names: list[str] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        import open_clip

        self.teacher = open_clip.create_model(
            clip_model, pretrained=clip_pretrained, force_image_size=clip_image_size,
            require_pretrained=clip_pretrained is not None,
        ).requires_grad_(False).eval()
        self.tokenizer = open_clip.get_tokenizer(clip_model)
        visual = self.teacher.visual
        size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
        self.clip_size = tuple(size)
        self.register_buffer("clip_mean", torch.tensor(visual.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(visual.image_std).view(1, 3, 1, 1), persistent=False)
        dim = self.teacher.text_projection.shape[1] if hasattr(self.teacher, "text_projection") else 512
        self.projector = nn.Linear(self.backbone.num_features, dim)  # e = W_e f(x)
        self.classifier = nn.Linear(dim, self.hparams.num_classes)   # s = W_c e
        # filled by bind_data() (cache_text_embeddings) when a fit starts
        self.register_buffer("class_text", torch.zeros(self.hparams.num_classes, dim), persistent=False)
        self.register_buffer("class_text_raw", torch.zeros(self.hparams.num_classes, dim), persistent=False)
        self.register_buffer("anchors", torch.zeros(self.hparams.num_classes, 0, dim), persistent=False)
        self.text_cache_key: tuple | None = None
        # the classifier starts from the class text once: at the first fit, unless loaded from a checkpoint
        self.classifier_from_text = False

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    # -- text side, once per fit ---------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, sentences: list[str]) -> torch.Tensor:
        # the teacher's own device: during setup() the module is not on the accelerator yet,
        # although ``self.device`` may already name it
        device = next(self.teacher.parameters()).device
        return self.teacher.encode_text(self.tokenizer(sentences).to(device)).float()

    @torch.no_grad()
    def cache_text_embeddings(self, classes: list[str], domains: list[str]) -> None:
        """T (normalised), T~ (raw) and the anchors A for these class and source-domain names."""
        key = (tuple(classes), tuple(domains))
        if key == self.text_cache_key:
            return
        names, words = self.prompt_names(classes), self.prompt_names(self.hparams.anchor_names or domains)
        per_template = torch.stack([self.encode_text([t.format(c=c) for c in names]) for t in TEMPLATES])
        raw = per_template.mean(dim=0)
        anchors = torch.stack([self.encode_text([ANCHOR_TEMPLATE.format(d=d, c=c) for c in names])
                               for d in words], dim=1)  # (K, J, D)
        self.class_text_raw, self.class_text, self.anchors = raw, F.normalize(raw, dim=1), anchors
        self.text_cache_key = key

    def prompt_names(self, names: list[str]) -> list[str]:
        """Names as prompts write them: as given (official) or with ``_`` as spaces (``readable_names``)."""
        return [n.replace("_", " ") for n in names] if self.hparams.readable_names else list(names)

    def bind_data(self, dm) -> None:
        """Cache the class and anchor text embeddings for the data module's class and source-domain
        names (fit, validate, test). Never touches the classifier (see :meth:`on_fit_start`)."""
        super().bind_data(dm)
        if not hasattr(dm, "classes") or not hasattr(dm, "train_domains"):
            raise RuntimeError("RISE needs a data module with class and domain names (classes, train_domains)")
        self.cache_text_embeddings(list(dm.classes), list(dm.train_domains))

    def on_fit_start(self) -> None:
        """A fresh model's first fit: the classifier starts from the class text embeddings (official
        ``model.fc.weight.data = text_features_ems``). Runs after a ``ckpt_path`` is restored, and a
        model restored from any checkpoint keeps its classifier."""
        if not self.classifier_from_text:
            with torch.no_grad():
                self.classifier.weight.copy_(self.class_text)
            self.classifier_from_text = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.classifier_from_text = True  # the checkpoint's classifier is the one to keep

    # -- model ---------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.embed(x)))

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        img = F.interpolate(x, size=self.clip_size, mode="bilinear", align_corners=False, antialias=True)
        feats = F.normalize(self.teacher.encode_image((img - self.clip_mean) / self.clip_std).float(), dim=1)
        return 100.0 * feats @ self.class_text.T

    def training_losses(self, x, y, domain):
        hp = self.hparams
        e = self.embed(x)
        s = self.classifier(self.dropout(e))
        terms = {"ce": F.cross_entropy(s, y)}
        if hp.w_kd:
            terms["kd"] = kd_loss(s, self.teacher_logits(x), hp.tau)
        terms["ad"] = absolute_distance_loss(e, self.class_text[y])
        terms["rd"] = relative_distance_loss(e, self.class_text_raw[y], self.anchors[y])
        terms["loss"] = hp.w_kd * terms.get("kd", 0.0) + hp.w_ce * terms["ce"] + hp.w_dist * (terms["ad"] + terms["rd"])
        return terms
