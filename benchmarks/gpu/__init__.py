"""The GPU run: ``run_all.sh`` (wheels, then every measurement for SD1.5, SD3.5-M and FLUX.1-dev)."""
