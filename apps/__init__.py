"""Applications on top of the runtime (the Gradio demo); built in the demo issue."""
