"""Tests of integrations/: the diffusers scheduler, pipeline and export."""
