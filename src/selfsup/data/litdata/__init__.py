"""Collections larger than memory as LitData datasets: the on-disk ``format``, the ``write``r
behind ``selfsup data optimize``, the ``samples`` a worker makes of a stored image, and the
streamed ``dataset`` with its lazy rows. Only ``dataset`` and ``write`` need LitData installed
(``pip install 'selfsup[stream]'``)."""
