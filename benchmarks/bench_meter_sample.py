"""What one `ProcessMeter.sample` costs (the browser's memory and CPU reading that
`browser.open` takes while a step runs), with Chromium up and one blank page, 200 samples.

    .venv/bin/python benchmarks/bench_meter_sample.py
"""

import asyncio
import time
from typing import Any

from planrun.adapters.chromium import ProcessMeter, SharedBrowser

SAMPLES = 200


def main() -> None:
    browser = SharedBrowser()

    async def work(driver: Any) -> tuple[float, int]:
        page = await driver.new_page()
        await page.goto("about:blank")
        meter = ProcessMeter(browser)
        began = time.perf_counter()
        for _ in range(SAMPLES):
            meter.sample()
        return (time.perf_counter() - began) / SAMPLES * 1000, len(browser.processes())

    ms, processes = asyncio.run(browser.call(work))
    print(f"ProcessMeter.sample: {ms:.2f} ms over {processes} processes")


if __name__ == "__main__":
    main()
