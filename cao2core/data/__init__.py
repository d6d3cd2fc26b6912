"""Label spaces (``labels``), class-folder trees of images (``imagefolder``), the MNIST world's data (``mnist``) and
the classifiers that judge samples and teach students (``classifiers``). ``imagenet/`` holds the shipped class
lists."""
