"""Data: read raw folders, masks, patching, the cached patch dataset, splits and cleaning."""
