"""The demo's page (Gradio Blocks): upload, sampled frames, chat with streamed answers, start over,
generation settings, examples, and the ``/answer`` API. What it does with the model is infer.serve.Demo."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import gradio as gr

from infer.serve import MODEL_QUEUE, Clip, Demo, generation_from

HELP = "Upload a video or an image (or pick an example), then ask about it."


def _reset() -> tuple:
    """upload, clip, history, chat, frames, status: nothing loaded."""
    return None, None, [], [], [], HELP


def _unreadable(path: str, e: Exception) -> str:
    """The reason, with the server's temporary path of the upload replaced by the file's name."""
    return f"cannot use {Path(path).name}: " + str(e).replace(str(path), Path(path).name)


def _upload(demo: Demo, path: str | None) -> tuple:
    if not path:
        return _reset()
    try:
        clip = demo.read(path)
    except Exception as e:  # the page's boundary: any unreadable upload is a message, the next one works
        message = f"**Error**: {_unreadable(path, e)}. Upload another video or image."
        return None, None, [], [], [], message  # the upload box is emptied, ready for the next file
    name = Path(path).name
    times = clip.timestamps or [None]
    gallery = [(f, "image" if t is None else f"{t:.1f} s") for f, t in zip(clip.frames, times, strict=True)]
    return gr.skip(), clip, [], [], gallery, f"**{name}**: {clip.describe()}. Ask a question."


def _ask(demo: Demo, question, clip: Clip | None, history, chat, decoding, temperature, max_new):
    """Streams (history, chat, question box) while the answer is generated."""
    question = (question or "").strip()
    if clip is None or not question:
        gr.Warning("Upload a video or an image first." if clip is None else "Type a question.")
        yield history, chat, question
        return
    gen = generation_from(demo.cfg.generation, decoding, temperature, max_new)
    chat = [*chat, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
    answer = ""
    for answer in demo.stream(clip, history, question, gen):
        chat[-1] = {"role": "assistant", "content": answer}
        yield history, chat, ""
    yield [*history, (question, answer)], chat, ""


def _answer(demo: Demo, path: str | None, question: str) -> str:
    if not path or not (question or "").strip():
        raise gr.Error("/answer takes a video (gradio_client.handle_file(PATH)) and a question")
    try:
        clip = demo.read(path)
    except Exception as e:  # one line for the caller, not a traceback
        raise gr.Error(_unreadable(path, e)) from None
    return demo.answer(clip, question)


def build_page(demo: Demo) -> gr.Blocks:
    gen = demo.cfg.generation
    source = demo.loaded.resolved.weights
    with gr.Blocks(title="Video-LLaMA demo") as page:
        gr.Markdown(f"# Video-LLaMA\nModel: `{source.parent.name}/{source.name}` ({gen.template} template)")
        clip, history = gr.State(None), gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Video or image", file_types=["video", "image"], elem_id="upload")
                status = gr.Markdown(HELP, elem_id="status")
                frames = gr.Gallery(label="Sampled frames", columns=4, height=220, elem_id="frames")
                examples = demo.cfg.examples
                with gr.Accordion("Generation", open=False):
                    decoding = gr.Radio(
                        ["greedy", "sampling"],
                        value="sampling" if gen.do_sample else "greedy",
                        label="Decoding",
                        elem_id="decoding",
                    )
                    temperature = gr.Slider(0.1, 2.0, value=gen.temperature, step=0.05, label="Temperature")
                    max_new = gr.Slider(1, 1024, value=gen.max_new_tokens, step=1, label="Max new tokens")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="Chat", height=420, elem_id="chat")
                question = gr.Textbox(placeholder="Ask about the video", show_label=False, elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Start over", elem_id="clear")
        model = {"concurrency_id": MODEL_QUEUE, "concurrency_limit": 1}
        loaded = [upload, clip, history, chat, frames, status]
        # .upload, not .change: emptying the box after a bad file must not start another read
        upload.upload(partial(_upload, demo), upload, loaded, api_visibility="private", **model)
        upload.clear(_reset, None, loaded, api_visibility="private")
        if examples:
            with gr.Row():
                gr.Examples(
                    examples,
                    inputs=upload,
                    outputs=loaded,
                    fn=partial(_upload, demo),
                    run_on_click=True,
                    label="Examples",
                )
        ask = [question, clip, history, chat, decoding, temperature, max_new]
        for trigger in (send.click, question.submit):
            trigger(
                partial(_ask, demo),
                ask,
                [history, chat, question],
                api_visibility="private",
                **model,
            )
        clear.click(_reset, None, loaded, api_visibility="private")
        # /answer: one question about a video in a fresh conversation, greedy (scripts, tests)
        api_video, api_question = gr.File(visible=False), gr.Textbox(visible=False)
        api_answer = gr.Textbox(visible=False)
        gr.Button(visible=False).click(
            partial(_answer, demo), [api_video, api_question], api_answer, api_name="answer", **model
        )
    return page
