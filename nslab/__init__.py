"""nslab: Docker's network modes, from the syscalls up."""
