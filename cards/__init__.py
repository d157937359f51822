"""Dataset cards: the template, statistics and plots of a published preference dataset."""
