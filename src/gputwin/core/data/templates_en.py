"""English sentence templates for the synthetic corpus (also used for locales without their own set).

Upper-case fields are PII and get labelled: {PERSON}, {PERSON:first}, {PERSON:last}, {EMAIL}, {PHONE},
{ADDRESS}, {ADDRESS:street}, {NATIONAL_ID}, {CREDIT_CARD}, {IBAN}, {DATE_OF_BIRTH}, {IP_ADDRESS}. A digit
suffix ({PERSON2}) is a second value of the type; the same field twice is the same value.
Lower-case fields are look-alikes that stay unlabelled: {order}, {sku}, {invoice}, {tracking}, {version},
{build}, {ticket}, {amount}, {date}, {time}, {qty}, {company}, {product}, {serial}, {ref}.
"""

from __future__ import annotations

PII_TEMPLATES: tuple[str, ...] = (
    # chat messages
    "Hi, this is {PERSON:first}. You can reach me at {PHONE} or {EMAIL}.",
    "hey it's {PERSON:first}, new number is {PHONE}, text me when you land",
    "hi can u call me back at {PHONE}? its about order {order}. thx {PERSON:first}",
    "I moved! New address: {ADDRESS}. Same phone, {PHONE}. - {PERSON:first}",
    "{PERSON:first} here, my SSN is {NATIONAL_ID} if you need it for the tax form.",
    "Can you send the contract to {EMAIL}? My assistant {PERSON} will sign it on {date}.",
    # web forms
    "Name: {PERSON} | Email: {EMAIL} | Phone: {PHONE} | Order: {order}",
    "Contact form - name: {PERSON}; email: {EMAIL}; message: my {product} arrived broken, order {order}.",
    "Applicant {PERSON}, date of birth {DATE_OF_BIRTH}, SSN {NATIONAL_ID}, email {EMAIL}.",
    "Billing address: {ADDRESS}. Card: {CREDIT_CARD}. Name on card: {PERSON}.",
    "Candidate {PERSON}, {EMAIL}, {PHONE}, available from {date}.",
    "Intake form: {PERSON}; DOB: {DATE_OF_BIRTH}; phone: {PHONE}; visit {ticket}.",
    "Please update my card on file to {CREDIT_CARD}. Thanks, {PERSON}",
    # emails
    "From: {PERSON} <{EMAIL}>\nSubject: Invoice {invoice}\nPlease find attached the invoice for order {order}.",
    "Dear {PERSON:first}, your ticket {ticket} has been updated. Reply to this email or call {PHONE}.",
    "Mr. {PERSON:last} asked us to change his email to {EMAIL} before {date}.",
    "Dear Ms. {PERSON:last}, we received your payment of {amount} from IBAN {IBAN}.",
    "Please transfer {amount} to {IBAN} (beneficiary: {PERSON}) by {date}.",
    "Hi {PERSON:first}, the signed lease for {ADDRESS} is attached. Best, {PERSON2}",
    # support tickets and logs
    "Ticket {ticket}: user {EMAIL} cannot log in from {IP_ADDRESS} after upgrading to {version}.",
    "Failed login for {EMAIL} from {IP_ADDRESS} at {time} (client {version}).",
    "Customer {PERSON} called about the {product} ({sku}). Callback number: {PHONE}.",
    "Account locked after 5 failed attempts from {IP_ADDRESS} and {IP_ADDRESS2}. User: {EMAIL}.",
    "The admin panel was accessed from {IP_ADDRESS} by {EMAIL} on {date} at {time}.",
    "VPN session for {PERSON:first} started from {IP_ADDRESS}, device {serial}.",
    "Firmware {build} installed on gateway {IP_ADDRESS}; owner {PERSON}.",
    "Server log {date} {time}: request from {IP_ADDRESS} blocked by rule {version}.",
    "Subscriber {PERSON} ({EMAIL}) upgraded to plan {sku} for {amount}/month.",
    "Returns: {PERSON}, {ADDRESS}, RMA {ticket}, item {sku}.",
    # HR and medical notes
    "New employee record: {PERSON}, born {DATE_OF_BIRTH}, SSN {NATIONAL_ID}.",
    "HR note: {PERSON} (DOB {DATE_OF_BIRTH}) moved to {ADDRESS:street}; payroll IBAN is now {IBAN}.",
    "Emergency contact: {PERSON2} ({PHONE}) for employee {PERSON}.",
    "Verify identity: last name {PERSON:last}, DOB {DATE_OF_BIRTH}, SSN {NATIONAL_ID}.",
    "Patient {PERSON}, born {DATE_OF_BIRTH}, lives at {ADDRESS}. Contact: {PHONE}.",
    "Meeting with {PERSON} and {PERSON2} moved to {time}. Dial-in: {PHONE}.",
    "Payroll: {PERSON}, employee since {date}, salary to IBAN {IBAN}.",
    # shipping and payments
    "Please ship order {order} to {PERSON}, {ADDRESS}. Tracking will be {tracking}.",
    "Shipping label: {PERSON}, {ADDRESS}, tel. {PHONE}, {qty} item(s).",
    "Delivery for {PERSON} at {ADDRESS:street} was left at the front door. Package {tracking}.",
    "Driver note: call {PHONE} on arrival at {ADDRESS:street}. Parcel {tracking}.",
    "Order {order} placed by {EMAIL}; ship to {ADDRESS}; paid with {CREDIT_CARD}.",
    "Charge {amount} to card {CREDIT_CARD} for invoice {invoice}.",
    "Your card {CREDIT_CARD} was charged {amount} on {date} for the {product}.",
    "Refund of {amount} for order {order} goes to IBAN {IBAN}, account holder {PERSON}.",
    "Wire from {PERSON} (IBAN {IBAN}) received, invoice {invoice} marked paid.",
    "Payment details: IBAN {IBAN}, reference {ref}, amount {amount}.",
    "Tenant: {PERSON}. Unit: {ADDRESS}. Rent {amount} via IBAN {IBAN}.",
    "{company} confirms {PERSON} ({PHONE}) will pick up order {order} at {time}.",
)

NO_PII_TEMPLATES: tuple[str, ...] = (
    "Order {order} has shipped. Tracking number: {tracking}.",
    "Invoice {invoice} for {amount} is due on {date}.",
    "Please upgrade to version {version}; build {build} has a known bug.",
    "Ticket {ticket} closed: the {product} ({sku}) was replaced.",
    "Your order {order} of {qty} x {product} will arrive on {date}.",
    "Reminder: the team meeting is at {time} on {date}.",
    "Serial {serial}, firmware {build}, last checked {date}.",
    "Reference {ref}: payment of {amount} received, thank you.",
    "Stock update: {sku} is back, {qty} units at {amount}.",
    "{company} confirmed the delivery window for order {order}: {date}, after {time}.",
    "Release notes for {version}: faster sync and a fix for ticket {ticket}.",
    "Return label created for {sku}; tracking {tracking}, invoice {invoice}.",
)
