"""Multi-scale deformable attention as an nn.Module: projections, sampling locations, the op, output."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddetr.ops import ms_deform_attn

_CPU_SOFTMAX_MIN_SIZE = 16


def softmax_last_dim(x: torch.Tensor) -> torch.Tensor:
    """``F.softmax(x, -1)``; on the CPU a last dimension shorter than 16 is padded with -inf to 16 first.

    PyTorch's CPU softmax over many short rows (e.g. 3 levels x 4 points = 12 per head) is 30-80x
    slower than over rows of 16 (torch 2.14, 6048 rows: 22 ms against 0.3 ms). The padding adds
    ``exp(-inf) = 0`` terms, so the values are those of the softmax up to float rounding (and the
    gradient flows through the slice unchanged). Traced and compiled graphs keep the plain softmax.
    """
    size = x.shape[-1]
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if x.device.type != "cpu" or size >= _CPU_SOFTMAX_MIN_SIZE or tracing:
        return F.softmax(x, -1)
    padded = F.pad(x, (0, _CPU_SOFTMAX_MIN_SIZE - size), value=float("-inf"))  # (..., 16)
    return F.softmax(padded, -1)[..., :size].contiguous()  # (..., size)


class MSDeformAttn(nn.Module):
    """Every query attends to ``num_points`` sampled locations per head and level around its reference.

    Sampling offsets and attention weights are linear functions of the query; the weights are a
    softmax over ``num_levels * num_points`` per head. Values are sampled bilinearly (zeros outside).
    """

    def __init__(
        self,
        hidden_dim: int,
        num_levels: int,
        num_heads: int,
        num_points: int,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        self.hidden_dim = hidden_dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.head_dim = hidden_dim // num_heads
        self.backend = backend
        self.sampling_offsets = nn.Linear(hidden_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(hidden_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(hidden_dim, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: offsets start on rings of radius 1..num_points, one direction
        per head; uniform attention; xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)  # (num_heads, 2)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        # (num_heads, 2) -> (num_heads, num_levels, num_points, 2), point p scaled by p + 1
        grid = directions[:, None, None, :].repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())  # (num_heads * num_levels * num_points * 2,)
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor | None,
        padding_mask: torch.Tensor | None = None,
        return_attention: bool = False,
        shapes: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attends from the queries to the flattened multi-level values.

        Args:
            query: (batch_size, num_queries, hidden_dim), position embedding already added.
            reference_points: (batch_size, num_queries, num_levels, 2) as (x, y) in [0, 1], or
                (batch_size, num_queries, num_levels, 4) as (cx, cy, w, h): offsets are then relative
                to the box size (``offset / num_points * wh / 2``).
            value_input: (batch_size, num_values, hidden_dim), the levels flattened one after another.
            spatial_shapes: (num_levels, 2) int64 (height, width) of every level, best on the device
                (it gives the offset normalisers; the op takes ``shapes``).
            level_start_index: (num_levels,) int64 offset of every level in ``num_values`` (the levels
                lie one after another; see ``ddetr.ops.ms_deform_attn``), or None.
            padding_mask: (batch_size, num_values) bool, True on padding (those values are zeroed).
            return_attention: also return the sampling locations and attention weights.
            shapes: ``spatial_shapes`` as Python ints (SymInts under ``torch.compile``), passed to the
                op so that it reads no tensor; when None the op reads ``spatial_shapes`` on the host.

        Returns:
            output (batch_size, num_queries, hidden_dim); with ``return_attention`` also
            sampling_locations (batch_size, num_queries, num_heads, num_levels, num_points, 2) and
            attention_weights (batch_size, num_queries, num_heads, num_levels, num_points).
        """
        batch_size, num_queries, _ = query.shape
        num_values = value_input.shape[1]
        # (B, S, D) -> (B * S, D): the projection's 2-d output is no view, so the padding is zeroed in place
        # without a copy (its backward needs no output); on a view autograd would copy the whole base
        value = self.value_proj(value_input.flatten(0, 1))
        if padding_mask is not None:
            value.masked_fill_(padding_mask.reshape(-1, 1), 0.0)
        value = value.view(batch_size, num_values, self.num_heads, self.head_dim)  # (B * S, D) -> (B, S, M, D)
        device_type = query.device.type
        if torch.is_autocast_enabled(device_type):  # one cast (and one saved copy) for both projections
            query = query.to(torch.get_autocast_dtype(device_type))
        # locations and weights in float32 also under autocast: half precision moves samples on large levels
        sampling_offsets = (
            self.sampling_offsets(query)
            .float()
            .view(batch_size, num_queries, self.num_heads, self.num_levels, self.num_points, 2)
        )  # (B, Lq, M, L, P, 2)
        attention_weights = (
            self.attention_weights(query)
            .float()
            .view(batch_size, num_queries, self.num_heads, self.num_levels * self.num_points)
        )  # (B, Lq, M, L*P)
        attention_weights = softmax_last_dim(attention_weights).view(
            batch_size, num_queries, self.num_heads, self.num_levels, self.num_points
        )  # (B, Lq, M, L, P)
        sampling_locations = self.sampling_locations(reference_points, sampling_offsets, spatial_shapes)
        output = ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, self.backend, shapes
        )  # (B, Lq, M*D)
        output = self.output_proj(output)
        if return_attention:
            return output, sampling_locations, attention_weights
        return output

    def sampling_locations(
        self, reference_points: torch.Tensor, sampling_offsets: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> torch.Tensor:
        """Where every head samples: ``reference_points`` (B, Lq, L, 2) moved by ``sampling_offsets``
        (B, Lq, M, L, P, 2) in pixels of each level (``spatial_shapes`` (L, 2) as (height, width)), or
        (B, Lq, L, 4) boxes moved by offsets relative to their size (``offset / num_points * wh / 2``).

        Returns:
            (B, Lq, M, L, P, 2) float32 (x, y), normalised to [0, 1] over each map (outside it the op reads zeros).
        """
        batch_size, num_queries = sampling_offsets.shape[:2]
        # The operands broadcast against the offsets (B, Lq, M, L, P, 2) are expanded over the points and
        # made contiguous, so their innermost run is L * P * 2 values instead of 2: the same arithmetic,
        # element for element, which the CPU's broadcasting kernels run 5-20x faster (benchmarks/step_parts).
        points = (self.num_levels, self.num_points, 2)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide x by its width and y by its height
            # (L, 2) as (W, H); shapes on the host take a small asynchronous copy (no sync)
            offset_normalizer = spatial_shapes.flip(-1).to(
                device=sampling_offsets.device, dtype=torch.float32, non_blocking=True
            )
            normalizer = offset_normalizer[:, None, :].expand(points).contiguous()  # (L, 2) -> (L, P, 2)
            reference = reference_points[:, :, None, :, None, :].expand(batch_size, num_queries, 1, *points)
            sampling_locations = reference.contiguous() + sampling_offsets / normalizer  # (B, Lq, M, L, P, 2)
        elif reference_points.shape[-1] == 4:
            # (B, Lq, L, 2) each -> (B, Lq, 1, L, P, 2)
            centre = reference_points[:, :, None, :, None, :2].expand(batch_size, num_queries, 1, *points)
            size = reference_points[:, :, None, :, None, 2:].expand(batch_size, num_queries, 1, *points)
            sampling_locations = (
                centre.contiguous() + sampling_offsets / self.num_points * size.contiguous() * 0.5
            )  # (B, Lq, M, L, P, 2)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape[-1]}")
        return sampling_locations


def set_attention_backend(model: nn.Module, backend: str) -> None:
    """Sets the backend of every ``MSDeformAttn`` in ``model`` ("auto", "pytorch", "cpu", "cuda")."""
    for submodule in model.modules():
        if isinstance(submodule, MSDeformAttn):
            submodule.backend = backend


def attention_backend(model: nn.Module) -> str:
    """The backend the ``MSDeformAttn`` layers of ``model`` run with: after ``set_attention_backend`` the
    layers, not the config the model was built from (``attn_backend``), hold the current one."""
    backends = {submodule.backend for submodule in model.modules() if isinstance(submodule, MSDeformAttn)}
    if len(backends) != 1:
        raise ValueError(f"expected one attention backend in the model, found {sorted(backends)}")
    return backends.pop()
