"""Project-local helpers the composition tutorial's templates call by relative import spec."""


def make_optimizer(optimizer_factory, model):
    """Apply an optimizer factory (a partial) to a model's parameters."""
    return optimizer_factory(model.parameters())
