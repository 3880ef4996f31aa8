"""Lowering to kernels, weight prepacking and memory planning."""

from cbir_engine.plan.lower import Lowering, Operand, PlanStep
from cbir_engine.plan.memory import Buffer, plan_offsets
from cbir_engine.plan.plan import Plan, build_plan

__all__ = ["Buffer", "Lowering", "Operand", "Plan", "PlanStep", "build_plan", "plan_offsets"]
