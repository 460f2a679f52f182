"""Model definitions: plain ``nn.Module`` s with a config dataclass each, and the registry of model kinds."""
