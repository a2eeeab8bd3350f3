"""Raw datasets in nnU-Net's format: the layout writer, synthetic generators and converters of public datasets."""
