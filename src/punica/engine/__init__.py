"""The engine: tensor-free scheduler and block manager, batch builder, model runner, sampler."""
