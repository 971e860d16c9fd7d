"""The benchmark's SMTP server (aiosmtpd): records each message's arrival time, Message-ID,
recipients and subject, one line a message, for the harness to match with purchases."""
import email.parser
import sys
import threading
import time

from aiosmtpd.controller import Controller


class Recorder:
    def __init__(self, path: str):
        self.out = open(path, "a", buffering=1)

    async def handle_DATA(self, server, session, envelope):
        at = time.time()
        head = email.parser.BytesHeaderParser().parsebytes(envelope.original_content or b"")
        self.out.write(f"{at:.6f}\t{head.get('Message-ID', '')}\t{','.join(envelope.rcpt_tos)}"
                       f"\t{head.get('Subject', '')}\n")
        return "250 OK"


if __name__ == "__main__":
    port, path = int(sys.argv[1]), sys.argv[2]
    Controller(Recorder(path), hostname="127.0.0.1", port=port).start()
    print("ready", flush=True)
    threading.Event().wait()
