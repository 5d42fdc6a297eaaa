"""3D face meshes: the analytic head, the embedded mesh corpus, real corpora (VOCASET, folders
of vertex sequences), the data module and a small shaded rasteriser."""
