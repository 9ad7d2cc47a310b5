"""Distillation configs."""
