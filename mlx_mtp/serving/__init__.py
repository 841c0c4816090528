"""The OpenAI-compatible server, by concern: its settings (:mod:`~mlx_mtp.serving.config`),
requests (:mod:`~mlx_mtp.serving.requests`), the worker that generates
(:mod:`~mlx_mtp.serving.worker`), response bodies (:mod:`~mlx_mtp.serving.responses`)
and the HTTP routes (:mod:`~mlx_mtp.serving.http`, through
:func:`~mlx_mtp.serving.app.make_app`). The command line is :mod:`mlx_mtp.server`."""
