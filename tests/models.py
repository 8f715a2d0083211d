"""Tiny models shared by the tests, in one place (torchao ``testing/model_architectures.py``)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv2d + BatchNorm blocks and a Linear head, on 1×8×8 images (the digits task's shape)."""

    input_shape = (1, 1, 8, 8)

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(self.pool(x).flatten(1))


class Conv1dNet(nn.Module):
    """Conv1d layers, one of them grouped (groups=4), and a Linear head, on 4-channel sequences of 32."""

    input_shape = (1, 4, 32)

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 16, 3, padding=1)
        self.grouped = nn.Conv1d(16, 32, 3, padding=1, groups=4)
        self.conv3 = nn.Conv1d(32, 32, 1)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.conv3(x))
        return self.fc(self.pool(x).flatten(1))


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class ResidualNet(nn.Module):
    """A stem conv, two residual blocks whose adds couple their channels, and a Linear head."""

    input_shape = (1, 3, 8, 8)

    def __init__(self, classes: int = 10, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.block1 = _Block(channels)
        self.block2 = _Block(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(self.pool(x).flatten(1))


def resnet18() -> nn.Module:
    """torchvision ResNet-18 with random weights (no download), in eval mode."""
    from torchvision.models import resnet18 as build

    return build(weights=None).eval()


def example_input(model: nn.Module, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A random input of the model's ``input_shape`` with ``batch`` samples."""
    shape = (batch, *model.input_shape[1:])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def sign_classes(inputs: torch.Tensor) -> torch.Tensor:
    """Four classes a small model can learn from ``inputs`` (signals or images): the signs of the
    means of their first two channels."""
    means = inputs[:, :2].flatten(2).mean(2)
    return means[:, 0].gt(0).long() + 2 * means[:, 1].gt(0).long()


def settle(model: nn.Module, steps: int = 3, batch: int = 16, seed: int = 0) -> nn.Module:
    """Run a few training-mode forwards so BatchNorm has non-trivial statistics, then eval mode."""
    model.train()
    with torch.no_grad():
        for step in range(steps):
            model(example_input(model, batch, seed + step))
    return model.eval()


class TinyText(nn.Module):
    """A text-like embedding model on dict inputs: ``input_ids`` and ``attention_mask``, (batch, 16)
    int64. Embedding → Linear → ReLU → Linear → mean over the unmasked tokens → L2-normalised."""

    seq_len = 16

    def __init__(self, vocab: int = 100, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token states and the sentence embedding."""
        states = self.fc2(torch.relu(self.fc1(self.embed(input_ids))))
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return states, nn.functional.normalize(pooled, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hidden(input_ids, attention_mask)[1]


class ModelOutput(dict):
    """Like transformers' ``ModelOutput``: a dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class TinyTextWithOutput(TinyText):
    """TinyText returning a ModelOutput-like object; ``Task.output`` picks ``sentence_embedding``."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ModelOutput:
        states, embedding = self.hidden(input_ids, attention_mask)
        return ModelOutput(last_hidden_state=states, sentence_embedding=embedding)


def text_inputs(batch: int = 1, seed: int = 0, vocab: int = 100) -> dict[str, torch.Tensor]:
    """Random token ids and an attention mask whose sentences have 4 to 16 tokens, then padding."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, TinyText.seq_len + 1, (batch, 1), generator=generator)
    return {
        "input_ids": torch.randint(1, vocab, (batch, TinyText.seq_len), generator=generator),
        "attention_mask": (torch.arange(TinyText.seq_len) < lengths).long(),
    }


def text_task(teacher: nn.Module, name: str = "tiny-text"):
    """``teacher`` (``model(input_ids, attention_mask)`` -> one embedding per sentence) as the teacher
    of an embedding task: unlabelled dict batches, cosine distillation, and the metric a
    sentence-embedding model is judged by, the mean cosine similarity of the candidate's embeddings
    to the teacher's on held-out sentences."""
    from search import Task

    train = [(text_inputs(16, seed=i), None) for i in range(4)]
    val = [(text_inputs(32, seed=100 + i), None) for i in range(2)]
    with torch.no_grad():
        references = [teacher(**inputs) for inputs, _ in val]

    def cosine_to_teacher(model, val):
        cosines = [
            torch.nn.functional.cosine_similarity(model(**inputs), reference, dim=1)
            for (inputs, _), reference in zip(val, references)
        ]
        return float(torch.cat(cosines).mean())

    return Task(teacher, train, val, text_inputs(1), cosine_to_teacher, name, distill_loss="cosine")


class TwoInputNet(nn.Module):
    """Two float inputs, called ``model(x, context)``: (batch, 8) and (batch, 4); 5 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_x = nn.Linear(8, 16)
        self.fc_context = nn.Linear(4, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc_x(x) + self.fc_context(context)))


def two_inputs(batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, generator=generator), torch.randn(batch, 4, generator=generator)


def tiny_bert(layers: int = 4, initializer_range: float = 0.02) -> nn.Module:
    """A transformers ``BertModel`` with random weights (their standard deviation
    ``initializer_range``), in eval mode: hidden 64, 4 heads of 16, FFN 128, vocabulary 100
    (``text_inputs`` fits it). Needs the ``transformers`` package."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        initializer_range=initializer_range,
    )
    return transformers.BertModel(config).eval()


class BertSentences(nn.Module):
    """:func:`tiny_bert` (as ``bert``) giving one embedding per sentence, its first token's last
    hidden state: a teacher for :func:`text_task`. Its weights are 5× BERT's usual scale: at 0.02
    each block adds so little to the residual stream that removing any one leaves the cosine at 0.9997."""

    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        self.bert = tiny_bert(layers, initializer_range=0.1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]


def tiny_llama(layers: int = 4, vocab: int = 100) -> nn.Module:
    """A transformers ``LlamaForCausalLM`` with random weights, in eval mode: hidden 64, 4 heads of 16,
    gated FFN 128, vocabulary 100, no KV cache (a forward at a fixed context length). Needs
    ``transformers``."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_vit(classes: int = 10) -> nn.Module:
    """torchvision's ``VisionTransformer`` (the class of ``vit_b_16``, whose own size is too slow for a
    test) with random weights, in eval mode: 32×32 images in 16×16 patches (4 tokens and the class
    token), 2 blocks, 4 heads, hidden 64, MLP 128."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=classes
    ).eval()


class SignalEncoder(nn.Module):
    """PyTorch's own ``nn.TransformerEncoder`` as a user writes one: a strided Conv1d patch embedding
    of 2×32 signals (8 tokens), a learned position table, 3 pre-norm blocks (hidden 16, 2 heads, FFN
    32), a mean over tokens."""

    input_shape = (1, 2, 32)

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv1d(2, 16, 4, stride=4)
        self.position = nn.Parameter(0.1 * torch.randn(1, 8, 16))
        block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, 3, enable_nested_tensor=False)
        self.head = nn.Linear(16, classes)
        with torch.no_grad():  # each block its own weights, as training gives them: nn.TransformerEncoder
            for p in self.encoder.parameters():  # clones one layer, and the exporter shares equal weights
                p.add_(0.1 * torch.randn_like(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x).transpose(1, 2) + self.position).mean(1))
