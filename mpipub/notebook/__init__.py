"""mpipub in Jupyter: a kernel that is rank 0 of an MPI job, with the engines on the other ranks.

What lives here:

- ``kernelspec``: ``mpipub kernel install | list | remove`` (kernelspecs whose argv starts the
  job with ``mpiexec`` or ``srun``, in "message" interrupt mode);
- ``kernel``: the kernel module that argv runs (``python -m mpipub.notebook.kernel -f ...``):
  rank 0 runs ipykernel with a client that owns the engines until shutdown, every other rank
  serves as an engine;
- ``forward``: engine output shown live in the cell that started the task (``[stdout:1]``),
  remote errors rendered readably, and the note an interrupt gives;
- ``magics``: ``%px`` / ``%%px`` (``%load_ext mpipub``; loaded by default in the kernel);
- ``ports``: kernel ports the MPI job's start-up cannot take, for code that starts kernels itself.

Nothing here is imported by a script or an engine that does not use Jupyter.
"""
