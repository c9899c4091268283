"""Values for the synthetic corpus, one maker per Faker locale: the PII to label, and look-alikes
(order numbers, product codes, tracking numbers, versions, other dates) that must stay unlabelled.

A maker owns one seeded Faker instance and draws everything else from that instance's random
generator, so one seed gives one stream of values.
"""

from __future__ import annotations

import datetime as dt
import string
from typing import Callable

from faker import Faker

Variants = dict[str, str]  # variant name -> text; "" is the default variant

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_FIRST_BIRTH_DAY, _LAST_BIRTH_DAY = dt.date(1940, 1, 1), dt.date(2007, 12, 31)
_FIRST_RECENT_DAY, _LAST_RECENT_DAY = dt.date(2019, 1, 1), dt.date(2025, 12, 31)
_NO_SPACE_NAME_LANGS = ("zh", "ja", "ko")
_PRODUCTS_EN = ("USB-C hub", "wireless mouse", "standing desk", "coffee grinder", "running shoes", "backpack",
                "router", "monitor arm", "phone case", "air fryer", "desk lamp", "yoga mat")
_PRODUCTS_ZH = ("蓝牙耳机", "电饭煲", "运动鞋", "保温杯", "机械键盘", "空气净化器", "行李箱", "台灯", "充电宝",
                "羽绒服")


def language_of(locale: str) -> str:
    """'zh' for zh_CN/zh_TW, 'en' for en_US, ... (the template set is chosen by language)."""
    return locale.split("_")[0].lower()


class ValueMaker:
    """PII and look-alike values for one locale, deterministic for a seed."""

    # variants a template may ask for besides the default, e.g. {PERSON:first}
    PII_VARIANTS: dict[str, frozenset[str]] = {"PERSON": frozenset({"first", "last"}), "ADDRESS": frozenset({"street"})}
    DECOY_KINDS = frozenset({"order", "sku", "invoice", "tracking", "version", "build", "ticket", "amount", "date",
                             "time", "qty", "company", "product", "serial", "ref"})

    def __init__(self, locale: str, seed: str) -> None:
        self.locale = locale
        self.lang = language_of(locale)
        self.fake = Faker(locale)
        self.fake.seed_instance(f"{seed}/{locale}")
        self.rng = self.fake.random
        self._seed = seed
        self._fallback: Faker | None = None
        self.decoys: dict[str, Callable[[], str]] = {
            "order": self._order,
            "sku": self._sku,
            "invoice": self._invoice,
            "tracking": self._tracking,
            "version": self._version,
            "build": self._build,
            "ticket": self._ticket,
            "amount": self._amount,
            "date": self._recent_date,
            "time": self._time,
            "qty": lambda: str(self.rng.randint(1, 12)),
            "company": self._company,
            "product": lambda: self.rng.choice(_PRODUCTS_ZH if self.lang == "zh" else _PRODUCTS_EN),
            "serial": self._serial,
            "ref": self._reference,
        }

    # --- PII ----------------------------------------------------------------------------------------------

    def pii(self, kind: str, person: Variants | None = None) -> Variants:
        """Variants of one fresh value of a canonical type; an email may be built from `person`."""
        maker = {
            "PERSON": self._person,
            "EMAIL": lambda: {"": self._email(person)},
            "PHONE": lambda: {"": self._phone()},
            "ADDRESS": self._address,
            "NATIONAL_ID": lambda: {"": self._faker("ssn")},
            "CREDIT_CARD": lambda: {"": self._card()},
            "IBAN": lambda: {"": self._iban()},
            "DATE_OF_BIRTH": lambda: {"": self._date(_FIRST_BIRTH_DAY, _LAST_BIRTH_DAY)},
            "IP_ADDRESS": lambda: {"": self._ip()},
        }[kind]
        return maker()

    def _faker(self, method: str) -> str:
        """Call a Faker method, borrowing en_US's when this locale lacks it (e.g. phones in en_PH)."""
        try:
            return str(getattr(self.fake, method)())
        except AttributeError:
            if self._fallback is None:
                self._fallback = Faker("en_US")
                self._fallback.seed_instance(f"{self._seed}/{self.locale}/en_US")
            return str(getattr(self._fallback, method)())

    def _person(self) -> Variants:
        first, last = self._faker("first_name"), self._faker("last_name")
        full = last + first if self.lang in _NO_SPACE_NAME_LANGS else f"{first} {last}"
        return {"": full, "first": first, "last": last}

    def _email(self, person: Variants | None) -> str:
        if person and person["first"].isascii() and self.rng.random() < 0.5:
            first, last = (_ascii_word(person[k]) for k in ("first", "last"))
            user = self.rng.choice((f"{first}.{last}", f"{first[:1]}{last}", f"{first}{self.rng.randint(1, 99)}",
                                    f"{first}_{last}"))
            domain = self.rng.choice((self._faker("free_email_domain"), self._faker("domain_name")))
            return f"{user}@{domain}"
        return self.rng.choice((self._faker("email"), self._faker("free_email"), self._faker("company_email")))

    def _phone(self) -> str:
        if self.lang != "zh":
            return self._faker("phone_number")
        roll = self.rng.random()
        if roll < 0.15:  # landline with area code
            return f"0{self.rng.choice(('10', '21', '20', '755', '571', '28'))}-{self.rng.randint(20000000, 89999999)}"
        mobile = self._faker("phone_number")
        if roll < 0.35:
            return f"+86 {mobile[:3]} {mobile[3:7]} {mobile[7:]}"
        if roll < 0.5:
            return f"{mobile[:3]}-{mobile[3:7]}-{mobile[7:]}"
        return mobile

    def _address(self) -> Variants:
        street = self._faker("street_address")
        if self.lang == "zh":
            full = "".join(self._faker(m) for m in ("province", "city", "district")) + street
            if self.rng.random() < 0.5:  # building, unit and flat
                building, unit, floor, flat = (self.rng.randint(1, n) for n in (30, 6, 30, 4))
                full += f"{building}号楼{unit}单元{floor}0{flat}室"
            return {"": full, "street": street}
        if self.locale == "en_US":  # Faker's en_US address() also makes military addresses; keep it civilian
            full = f"{street}, {self._faker('city')}, {self._faker('state_abbr')} {self._faker('zipcode')}"
        else:
            full = self._faker("address").replace("\n", ", ")
        return {"": full, "street": street}

    def _card(self) -> str:
        number = self._faker("credit_card_number")
        roll = self.rng.random()
        if len(number) == 16 and roll < 0.55:
            return (" " if roll < 0.4 else "-").join(number[i:i + 4] for i in range(0, 16, 4))
        return number

    def _iban(self) -> str:
        iban = self._faker("iban")
        if self.rng.random() < 0.4:  # the printed form, in groups of four
            return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))
        return iban

    def _ip(self) -> str:
        roll = self.rng.random()
        if roll < 0.12:
            return self._faker("ipv6")
        if roll < 0.27:
            return self._faker("ipv4_private")
        return self._faker("ipv4_public")

    def _date(self, first: dt.date, last: dt.date) -> str:
        day = first + dt.timedelta(days=self.rng.randint(0, (last - first).days))
        if self.lang == "zh":
            forms = (f"{day.year}年{day.month}月{day.day}日", day.isoformat(),
                     f"{day.year}/{day.month:02d}/{day.day:02d}", f"{day.year}.{day.month:02d}.{day.day:02d}")
        else:
            month = _MONTHS[day.month - 1]
            forms = (f"{day.month:02d}/{day.day:02d}/{day.year}", f"{month} {day.day}, {day.year}", day.isoformat(),
                     f"{day.day} {month} {day.year}", f"{day.month}/{day.day}/{day.year}")
        return self.rng.choice(forms)

    # --- look-alikes (never labelled) ---------------------------------------------------------------------

    def decoy(self, kind: str) -> str:
        return self.decoys[kind]()

    def _digits(self, n: int) -> str:
        return "".join(self.rng.choices(string.digits, k=n))

    def _letters(self, n: int) -> str:
        return "".join(self.rng.choices(string.ascii_uppercase, k=n))

    def _order(self) -> str:
        if self.lang == "zh":  # Chinese shops print 16-19 digit order numbers, close to an ID card number
            return self.rng.choice(("2", "3", "5")) + self._digits(self.rng.choice((15, 17, 18)))
        return self.rng.choice((f"#{self._digits(7)}", f"ORD-{self.rng.randint(2019, 2025)}-{self._digits(6)}",
                                f"{self._digits(3)}-{self._digits(7)}-{self._digits(7)}", f"A{self._digits(9)}"))

    def _sku(self) -> str:
        return self.rng.choice((
            f"SKU-{self._letters(2)}-{self._digits(4)}",
            f"{self._letters(2)}{self._digits(3)}-{self._letters(1)}",
            f"PN {self._digits(4)}-{self._digits(3)}-{self._digits(2)}",
            f"{self._letters(3)}{self._digits(5)}",
        ))

    def _invoice(self) -> str:
        if self.lang == "zh":
            return self._digits(self.rng.choice((8, 12, 20)))
        return self.rng.choice((f"INV-{self._digits(6)}", f"{self.rng.randint(2019, 2025)}/INV/{self._digits(5)}",
                                f"IN{self._digits(8)}"))

    def _tracking(self) -> str:
        return self.rng.choice((
            "1Z" + "".join(self.rng.choices(string.ascii_uppercase + string.digits, k=16)),  # UPS
            "94" + self._digits(20),  # USPS
            self._digits(12),  # FedEx
            f"SF{self._digits(13)}",  # SF Express
            f"YT{self._digits(16)}",  # YTO Express
            f"{self._letters(2)}{self._digits(9)}CN",  # China Post
        ))

    def _version(self) -> str:
        return self.rng.choice((f"v{self.rng.randint(1, 9)}.{self.rng.randint(0, 30)}.{self.rng.randint(0, 20)}",
                                f"{self.rng.randint(1, 20)}.{self.rng.randint(0, 9)}.{self.rng.randint(0, 99)}"))

    def _build(self) -> str:  # four dotted numbers, like an IPv4 address
        major, minor, patch, build = (self.rng.randint(low, high) for low, high in ((0, 250), (0, 250), (0, 99), (100, 250)))
        return f"{major}.{minor}.{patch}.{build}"

    def _ticket(self) -> str:
        if self.lang == "zh":
            return f"GD{self.rng.randint(2019, 2025)}{self._digits(8)}"
        return self.rng.choice((f"#{self._digits(5)}", f"CS-{self._digits(6)}", f"TKT-{self._digits(4)}"))

    def _amount(self) -> str:
        value = self.rng.randint(3, 4999) + self.rng.choice((0, 0.5, 0.99, 0.49))
        return f"¥{value:,.2f}" if self.lang == "zh" else f"${value:,.2f}"

    def _recent_date(self) -> str:  # a date that is not a date of birth (orders, meetings, deliveries)
        return self._date(_FIRST_RECENT_DAY, _LAST_RECENT_DAY)

    def _time(self) -> str:
        hour, minute = self.rng.randint(8, 20), self.rng.choice((0, 15, 30, 45))
        if self.lang == "zh":
            return f"{hour}:{minute:02d}"
        return f"{(hour - 1) % 12 + 1}:{minute:02d} {'PM' if hour >= 12 else 'AM'}"

    def _company(self) -> str:
        if self.lang == "zh":
            return self._faker("company")
        # Faker's "Palmer-Farley" style names read like people; keep a suffix so they read like firms
        return f"{self._faker('last_name')} {self._faker('company_suffix')}"

    def _serial(self) -> str:
        return f"{self._letters(3)}{self._digits(4)}{self._letters(2)}{self._digits(2)}"

    def _reference(self) -> str:  # ten digits, like a phone number
        return self._digits(10)


def _ascii_word(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum()) or "user"

