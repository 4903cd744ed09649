"""Training recipes and stages (pretrain / finetune); built in the training issue."""
