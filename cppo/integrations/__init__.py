"""CPPO inside other RL frameworks. Each integration is its own module, imported on demand, so
that `import cppo.integrations` never needs the framework it integrates with:

    from cppo.integrations.trl import CPPOConfig, CPPOTrainer     # needs `pip install 'cppo[trl]'`

docs/trl.md shows the switch from a TRL GRPO script and lists the TRL internals it relies on.
"""
