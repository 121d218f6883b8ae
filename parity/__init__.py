"""parity's top layer: the command line (``parity.cli``) and the pytest plugin
(``parity.pytest_plugin``). They drive the harness and render its results with the reports;
nothing below imports them."""
