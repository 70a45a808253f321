"""Lightning strategies (registered with Lightning's StrategyRegistry on import)."""

__all__: list[str] = []
