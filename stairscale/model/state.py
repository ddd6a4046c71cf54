"""The recurrent state a model carries from one segment to the next.

All lanes of a batch advance in lockstep (every lane consumes M tokens per step), so stream
positions are shared by the lanes while document ids are per lane.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

HIDDEN = -1  # document id of a row that no query may attend to (padding, reset lanes)


@dataclass
class Rows:
    """Per-layer hidden rows with their stream positions and document ids.

    h:   [L, B, T, d] the layer-l *inputs* of T rows of B lanes (L may be 1 for rows that every
         layer reads, such as the cache of final outputs)
    pos: [T] stream positions, ascending, shared by all lanes
    doc: [B, T] document id of each row; HIDDEN rows are never visible as keys
    """

    h: Tensor
    pos: Tensor
    doc: Tensor

    def __len__(self) -> int:
        return self.pos.shape[0]

    @staticmethod
    def cat(parts: list[Rows | None]) -> Rows | None:
        parts = [p for p in parts if p is not None and len(p) > 0]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        layers = max(p.h.shape[0] for p in parts)
        return Rows(
            h=torch.cat([p.h.expand(layers, -1, -1, -1) for p in parts], dim=2),
            pos=torch.cat([p.pos for p in parts]),
            doc=torch.cat([p.doc for p in parts], dim=1),
        )

    def last(self, count: int, skip: int = 0) -> Rows:
        """The last `count` rows before the last `skip` ones."""
        stop = max(0, len(self) - skip)
        start = max(0, stop - count)
        return Rows(self.h[:, :, start:stop], self.pos[start:stop], self.doc[:, start:stop])

    def detach(self) -> Rows:
        return Rows(self.h.detach(), self.pos, self.doc)

    def hide_lanes(self, lanes: Tensor) -> Rows:
        return Rows(self.h, self.pos, self.doc.masked_fill(lanes[:, None], HIDDEN))


class RecurrentState:
    """What a model carries across a segment boundary, for B lanes.

    position: tokens consumed so far by every lane
    doc:      [B] id of the document each lane is in (ids grow by one at every document start)
    rows:     named per-layer rows, owned by the schedule (e.g. "step0", "cache", "memory1")
    """

    def __init__(self, position: int, doc: Tensor, rows: dict[str, Rows]):
        self.position = position
        self.doc = doc
        self.rows = rows

    @classmethod
    def initial(cls, lanes: int, device: torch.device | str = "cpu") -> RecurrentState:
        """A fresh stream: no carried rows (absent, not zero)."""
        return cls(0, torch.zeros(lanes, dtype=torch.long, device=device), {})

    def reset(self, lanes: Tensor) -> RecurrentState:
        """Forget everything carried for the lanes where `lanes` is True (a new stream starts)."""
        rows = {name: r.hide_lanes(lanes) for name, r in self.rows.items()}
        return RecurrentState(self.position, self.doc + lanes.long(), rows)

    def state_dict(self) -> dict[str, Tensor]:
        out = {"position": torch.tensor(self.position), "doc": self.doc}
        for name, r in self.rows.items():
            out[f"rows.{name}.h"] = r.h
            out[f"rows.{name}.pos"] = r.pos
            out[f"rows.{name}.doc"] = r.doc
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.position = int(state["position"])
        self.doc = state["doc"]
        names = {key.split(".")[1] for key in state if key.startswith("rows.")}
        self.rows = {
            n: Rows(state[f"rows.{n}.h"], state[f"rows.{n}.pos"], state[f"rows.{n}.doc"]) for n in names
        }
