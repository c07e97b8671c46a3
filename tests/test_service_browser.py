"""The service's page in a real browser: headless Debian chromium driven by Selenium enrols
matplotlib's grace_hopper.jpg, verifies a rotated copy, and shows the 401 message for a wrong
token. Every resource the page loads comes from the server itself."""
import os
import shutil

import pytest

from tests.helpers.service import Server, token

CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
CHROMEDRIVER = shutil.which('chromedriver') or '/usr/bin/chromedriver'
M = 128
# The same face after another alignment differs in 2-4 of 32 indices under the tiny random
# model (threads make the crop differ by a little between runs): a quarter of m is a wide margin.
THRESHOLD = M // 4
WAIT_S = 90

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)) and not os.environ.get('CI'):
    pytest.skip('needs Debian chromium and chromium-driver (.ci/run installs them)',
                allow_module_level=True)


@pytest.fixture(scope='module')
def page(tmp_path_factory):
    import matplotlib.cbook
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    from tests.helpers.tiny_iom import make_tiny_model
    work = str(tmp_path_factory.mktemp('browser'))
    cfg_path = make_tiny_model(work, m=M)
    grace = str(matplotlib.cbook.get_sample_data('grace_hopper.jpg', asfileobj=False))
    rotated = os.path.join(work, 'grace_rotated.png')
    with Image.open(grace) as img:
        img.convert('RGB').rotate(25, resample=Image.BICUBIC, expand=True,
                                  fillcolor=(255, 255, 255)).save(rotated)
    db = os.path.join(work, 'g.sqlite')
    server = Server(work, db, '--cfg_path', cfg_path, '--threshold', str(THRESHOLD))
    admin = token(work, db, 'admin')
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
                '--disable-background-networking', '--disable-component-update',
                '--disable-default-apps', '--disable-extensions', '--disable-sync',
                '--no-first-run', '--no-default-browser-check', '--metrics-recording-only',
                f"--user-data-dir={os.path.join(work, 'chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))
    try:
        yield driver, server, admin, grace, rotated
    finally:
        driver.quit()
        server.stop()


def answer_after(driver, button, *fragments):
    """Click `button`, wait until the answer shows one of `fragments`, return its text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    answer = driver.find_element(By.ID, 'answer')
    driver.execute_script("arguments[0].textContent = ''", answer)
    driver.find_element(By.ID, button).click()
    WebDriverWait(driver, WAIT_S).until(
        lambda d: any(f in answer.text for f in fragments) or answer.text.startswith('Error'))
    return answer.text


def test_enrol_then_verify_a_rotated_copy_and_a_wrong_token(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver, server, admin, grace, rotated = page
    driver.get(server.url + '/')
    assert driver.title == 'IoMFace verification'
    field = driver.find_element
    field(By.ID, 'token').send_keys(admin)
    field(By.ID, 'name').send_keys('Grace Hopper')
    field(By.ID, 'file').send_keys(grace)
    text = answer_after(driver, 'enroll', 'Enrolled')
    assert text == 'Enrolled Grace Hopper (1 template(s))', text
    assert field(By.ID, 'crop').get_attribute('src').startswith('data:image/png;base64,')
    field(By.ID, 'file').send_keys(rotated)
    text = answer_after(driver, 'verify', 'MATCH')
    print('browser verify of the rotated copy:', text)
    # The server runs with the defaults: the decision, no distance.
    assert text == 'MATCH: Grace Hopper', text
    # The crop shown is what the server hashed (an image decodes asynchronously: wait for it).
    crop = WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script(
        "const i = document.getElementById('crop');"
        "return i.complete && i.naturalWidth ? [i.naturalWidth, i.naturalHeight] : null;"))
    assert crop == [112, 112]
    text = answer_after(driver, 'identify', 'Best match', 'No one')
    assert text == 'Best match: Grace Hopper', text
    field(By.ID, 'token').clear()
    field(By.ID, 'token').send_keys('iomf_wrong')
    text = answer_after(driver, 'verify', 'Error')
    assert text == 'Error 401: invalid or revoked token (check the token)', text
    # Nothing was fetched from anywhere but the server.
    origins = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin);")
    assert origins and set(origins) == {server.url}, origins
