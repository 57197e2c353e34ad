"""PEFT modules as named, composable sets (bottleneck adapters; more types plug in here)."""

from fedmm.peft.adapter import COMBINES, AdapterBank, BottleneckAdapter

__all__ = ["COMBINES", "AdapterBank", "BottleneckAdapter"]
