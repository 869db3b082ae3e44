"""PEFT methods beside LoRA (prompt tuning, IA3, LoHa, AdaLoRA, ...), one module each, sharing the
config, checkpoint and PeftModel machinery. LoRA itself lives in layers/ and injector/.
"""
