"""Weight files: reading every supported format safely and loading it strictly (`load`), mapping other libraries'
key layouts onto OpenAI's and back (`layouts`), reading OpenAI's TorchScript archives (`torchscript`), and the
architecture recorded beside the files this project writes (`arch`)."""
