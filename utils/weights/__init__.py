"""Weight files: reading every supported format safely and loading it strictly (`load`), mapping other libraries'
key layouts onto OpenAI's and back (`layouts`), and reading OpenAI's TorchScript archives (`torchscript`)."""
