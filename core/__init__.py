"""ddsuite.core: the distillation engine shared by every application."""
