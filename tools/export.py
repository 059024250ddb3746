"""Export to ONNX: ``python tools/export.py --weights runs/detection --out ssdlite.onnx --int8``; see --help."""
from heads.cli import export_main

if __name__ == "__main__":
    export_main()
